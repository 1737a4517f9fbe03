"""The dead-letter producer: rejected records go to ``<topic><suffix>`` (DESIGN I3)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError

from bluestream.consumers.envelope import Envelope
from bluestream.consumers.kafka_clients import kafka_client_options, stop_client
from bluestream.errors import DocumentError
from bluestream.settings import Settings

__all__ = ["DLQ_HEADERS", "KafkaDeadLetters"]


class KafkaDeadLetters:
    """Sends dead letters to ``<topic><suffix>`` with the original key, value and headers
    plus ``error``, ``reason``, ``source-topic``, ``source-partition``, ``source-offset``.

    At least once: a batch retried after a store outage dead-letters its rejects again.
    The source coordinates identify a dead letter; ``bluestream dlq list`` and
    ``replay --all`` show and replay each source record once."""

    def __init__(self, settings: Settings) -> None:
        self._suffix = settings.kafka.dlq_suffix
        self._producer = AIOKafkaProducer(
            **kafka_client_options(settings.kafka),
            client_id=f"{settings.kafka.client_id}-dlq",
            acks="all",
            # Not idempotent: when the broker refuses one batch as too large for the
            # dead-letter topic, aiokafka's idempotent producer never renumbers what
            # follows, so every later send to that partition failed (OutOfOrderSequence)
            # and the source partition could never be committed past the record. Dead
            # letters are at-least-once anyway (identified by their source coordinates).
            enable_idempotence=False,
            # Dead letters carry the original bytes, which may exceed our own limit
            # (that can be why they are dead): allow what the broker allows by default.
            max_request_size=max(settings.limits.max_message_bytes, 32 * 1024 * 1024)
            + 1024 * 1024,
            request_timeout_ms=30_000,
        )
        self._pending: list[tuple[Envelope, list[tuple[str, bytes]], asyncio.Future[Any]]] = []

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await stop_client(self._producer.stop, "dead-letter producer")

    async def send(self, env: Envelope, error: DocumentError) -> None:
        headers = [(k, v) for k, v in env.headers if k not in DLQ_HEADERS]
        headers += [
            ("error", str(error).encode()[:4000]),
            ("reason", error.reason.encode()),
            ("source-topic", env.topic.encode()),
            ("source-partition", str(env.partition).encode()),
            ("source-offset", str(env.offset).encode()),
        ]
        try:
            fut = await self._producer.send(env.topic + self._suffix, value=env.value,
                                            key=env.key, headers=headers)
        except MessageSizeTooLargeError:
            fut = await self._send_without_value(env, headers)
        self._pending.append((env, headers, fut))

    async def _send_without_value(self, env: Envelope,
                                  headers: list[tuple[str, bytes]]) -> asyncio.Future[Any]:
        """Too big even for the dead-letter topic: keep the record's coordinates (the
        original stays in the source topic until retention) and say so."""
        headers = [*headers, ("value-omitted", str(len(env.value or b"")).encode())]
        fut: asyncio.Future[Any] = await self._producer.send(
            env.topic + self._suffix, value=None, key=env.key, headers=headers)
        return fut

    async def flush(self) -> None:
        """Wait until every dead letter sent so far is acknowledged by the broker.

        A dead letter the broker refuses as too large (the dead-letter topic may have a
        smaller ``max.message.bytes`` than its source) is sent again without its value,
        so one oversized record cannot block its partition forever."""
        pending, self._pending = self._pending, []
        # Every future is awaited, whatever fails first (none is left unretrieved).
        results = await asyncio.gather(*(fut for _, _, fut in pending),
                                       return_exceptions=True)
        retry = []
        failure: BaseException | None = None
        for (env, headers, _), result in zip(pending, results, strict=True):
            if isinstance(result, MessageSizeTooLargeError):
                retry.append(await self._send_without_value(env, headers))
            elif isinstance(result, BaseException) and failure is None:
                failure = result
        if retry:
            retried = await asyncio.gather(*retry, return_exceptions=True)
            failure = failure or next((r for r in retried if isinstance(r, BaseException)),
                                      None)
        if failure is not None:
            raise failure  # Kafka's error: the batch is retried (KafkaSource rewinds)


#: Headers a dead letter gets from us; a producer's own headers of these names are
#: dropped so that they cannot pass for ours.
DLQ_HEADERS = frozenset({"error", "reason", "source-topic", "source-partition",
                         "source-offset", "value-omitted"})
