"""Google Cloud Pub/Sub: the REST client, the pull and push sources, the topic sink.

* :mod:`.client`: the REST calls (one client per process, :func:`client_for`);
* :mod:`.messages`: messages <-> jobs and records; subscription and topic names;
* :mod:`.pull`: the pull source, with :mod:`.leasing` (lease extension) and
  :mod:`.acking` (batched acks and nacks) as its parts;
* :mod:`.push`: the push source for ``worker serve``, with :mod:`.oidc` checking tokens;
* :mod:`.sink`: results published to a topic.
"""

from __future__ import annotations

from .client import PUBSUB_URL, PubSubClient, chunk_ack_ids, chunk_messages, client_for
from .messages import (
    delivery_fields,
    encode_data,
    parse_subscription,
    parse_topic,
    record_message,
    uses_pubsub,
)
from .oidc import OidcVerifier, make_verifier
from .pull import PubSubDelivery, PubSubSource
from .push import MAX_PUSH_BODY_BYTES, PushDelivery, PushSource
from .sink import PubSubSink

__all__ = [
    "MAX_PUSH_BODY_BYTES",
    "PUBSUB_URL",
    "OidcVerifier",
    "PubSubClient",
    "PubSubDelivery",
    "PubSubSink",
    "PubSubSource",
    "PushDelivery",
    "PushSource",
    "chunk_ack_ids",
    "chunk_messages",
    "client_for",
    "delivery_fields",
    "encode_data",
    "make_verifier",
    "parse_subscription",
    "parse_topic",
    "record_message",
    "uses_pubsub",
]
