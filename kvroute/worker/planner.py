"""Decide how much of a session's KV cache a new prompt can reuse (I/O-free, no model calls).

The session invariant (docs/design.md, *The session invariant*): text ``T``, token ids ``K`` and
cache ``S`` always agree, with ``len(S) == len(K)``. Given the rendered prompt of a new turn
(docs/design.md, *Turn paths*):

- **text prefix**: the prompt starts with ``T`` -> tokenize only the remainder (no BOS) and append
  it to ``K``. Matching on text, not tokens, is what makes this robust: re-tokenizing a generated
  reply often gives other ids than the ones sampled (BPE is not unique). Text alone is not
  enough, though: a prompt is text plus the places of the template's control tokens
  (``engine.prompt``), and ``<|im_end|>`` typed in a message is text. So the prefix must also
  carry the control tokens exactly where ``K`` has them; a history edited so that template
  markers of ``T`` now fall inside a message content takes the token-prefix path instead.
- **token prefix**: otherwise tokenize the whole prompt and keep the longest common token prefix
  with ``K``; the cache is trimmed to it.
- **cold**: nothing in common.
- **full hit**: everything is cached already (identical resend, regenerate). There are no fresh
  logits to sample from, so one token is rolled back and fed again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvroute.engine.prompt import Prompt, PromptCodec
from kvroute.proto.messages import CachePath


@dataclass(frozen=True)
class PrefillPlan:
    """What a turn must feed.

    Attributes
    ----------
    path:
        ``COLD``, ``TEXT_PREFIX`` or ``TOKEN_PREFIX``.
    prompt_ids:
        The token ids the model will have seen once the prompt is in (``keep`` cached + new).
    keep:
        Positions of the existing cache reused as they are.
    """

    path: CachePath
    prompt_ids: list[int]
    keep: int

    @property
    def new_ids(self) -> list[int]:
        """Ids to prefill (never empty)."""
        return self.prompt_ids[self.keep :]


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def extends(
    prompt: Prompt, cached_text: str, cached_ids: Sequence[int], codec: PromptCodec
) -> bool:
    """Whether ``prompt`` starts with what the session holds, control tokens included.

    The cached ids must spell ``cached_text`` with their control ids exactly at the prompt's
    markers; ids that spell it otherwise (e.g. a control token the model generated, which left
    no text) do not count.
    """
    if not cached_ids or not prompt.text.startswith(cached_text):
        return False
    head = prompt.head(len(cached_text))
    return head is not None and head == codec.decode(cached_ids)


def plan_prefill(
    cached_text: str,
    cached_ids: Sequence[int],
    prompt: Prompt,
    codec: PromptCodec,
) -> PrefillPlan:
    """Plan the prefill of ``prompt`` against a session holding ``cached_text`` / ``cached_ids``.

    ``codec`` tokenizes the prompt (no BOS): markers as control ids, everything else as text.
    """
    if extends(prompt, cached_text, cached_ids, codec):
        prompt_ids = list(cached_ids) + codec.encode(prompt, len(cached_text))
        keep, path = len(cached_ids), CachePath.TEXT_PREFIX
    else:
        prompt_ids = codec.encode(prompt)
        keep = common_prefix_len(cached_ids, prompt_ids)
        path = CachePath.TOKEN_PREFIX if keep else CachePath.COLD
    if keep >= len(prompt_ids):
        keep = len(prompt_ids) - 1  # full hit: re-feed the last token for fresh logits
    assert keep >= 0 and prompt_ids, "a rendered prompt is never empty"
    return PrefillPlan(path=path, prompt_ids=prompt_ids, keep=keep)
