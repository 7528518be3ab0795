#!/bin/sh
# Make sure Debian's chromium and chromedriver are installed: the chat page's browser test
# (tests/test_chat_page.py) drives them with selenium. Idempotent: apt-get runs only when one
# of them is missing and we are root on a Debian-like system; otherwise it says what to do.
# Never fatal: without them the test skips, or fails under CI=true, saying why.
set -u
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "ensure-chromium: installing chromium and chromium-driver (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    if apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; then
        exit 0
    fi
    echo "ensure-chromium: apt-get failed; the browser test cannot run" >&2
    exit 0
fi
echo "ensure-chromium: /usr/bin/chromium or /usr/bin/chromedriver is missing and this is not" \
    "root with apt-get; the browser test will skip (run: sudo apt-get install chromium" \
    "chromium-driver)" >&2
exit 0
