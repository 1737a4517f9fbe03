"""What every Kafka client of bluestream shares: connection and security options, and
a stop that tolerates a broker that is gone."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from bluestream.log import get_logger
from bluestream.settings import KafkaSettings

__all__ = ["kafka_client_options", "stop_client"]

log = get_logger("bluestream.kafka")


def kafka_client_options(k: KafkaSettings) -> dict[str, Any]:
    """Connection and security options shared by every client we create."""
    opts: dict[str, Any] = {"bootstrap_servers": k.bootstrap,
                            "security_protocol": k.security_protocol}
    if k.security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        opts["ssl_context"] = create_ssl_context(
            cafile=str(k.ssl_cafile) if k.ssl_cafile else None,
            certfile=str(k.ssl_certfile) if k.ssl_certfile else None,
            keyfile=str(k.ssl_keyfile) if k.ssl_keyfile else None,
        )
    if k.security_protocol.startswith("SASL"):
        opts["sasl_mechanism"] = k.sasl_mechanism
        opts["sasl_plain_username"] = k.sasl_username
        opts["sasl_plain_password"] = (k.sasl_password.get_secret_value()
                                       if k.sasl_password else None)
    return opts


async def stop_client(stop: Callable[[], Awaitable[None]], what: str) -> None:
    """Stop an aiokafka client, tolerating what it raises when Kafka is gone.

    With a fetch sleeping in a retry, aiokafka's close cancels that task and then
    awaits it, re-raising *its* CancelledError in our task. That cancellation is not
    ours (our task is not being cancelled), so it must not abort the shutdown.
    """
    try:
        await stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.warning("Kafka client stopped uncleanly (Kafka unreachable?)", client=what)
    except Exception as exc:
        log.warning("Kafka client stop failed", client=what, error=repr(exc))
