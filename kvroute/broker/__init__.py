"""The broker: pins each chat session to one worker and forwards its frames both ways.

:mod:`~kvroute.broker.routing` is the I/O-free core (placement, stickiness, in-flight requests,
liveness, session ownership and per-client limits; its records in :mod:`~kvroute.broker.records`);
:mod:`~kvroute.broker.service` is the ZeroMQ adapter around it, :mod:`~kvroute.broker.forwarder`
its per-message behaviour and :mod:`~kvroute.broker.curve` its CURVE authentication.
"""

from .config import BrokerConfig, BrokerStats
from .routing import RoutingTable
from .service import Broker, BrokerError

__all__ = ["Broker", "BrokerConfig", "BrokerError", "BrokerStats", "RoutingTable"]
