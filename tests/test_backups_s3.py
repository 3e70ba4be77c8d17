"""S3 backups verified through an S3-compatible endpoint named by the environment:
PLUGINMON_TEST_S3_ENDPOINT (e.g. http://127.0.0.1:9000), PLUGINMON_TEST_S3_ACCESS_KEY_ID,
PLUGINMON_TEST_S3_SECRET_ACCESS_KEY, PLUGINMON_TEST_S3_BUCKET (created when missing) and
optionally PLUGINMON_TEST_S3_REGION. Skipped, with the reason, when no endpoint is given."""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from pluginmon.registry.backup_readers import Expected, ReadResult, S3Reader, VerifyStatus

ENDPOINT = os.environ.get("PLUGINMON_TEST_S3_ENDPOINT")


@dataclass(frozen=True)
class Bucket:
    client: Any
    name: str
    reader: S3Reader


@pytest.fixture
def bucket() -> Bucket:
    if not ENDPOINT:
        pytest.skip("no S3 endpoint: set PLUGINMON_TEST_S3_ENDPOINT (and its keys and bucket)")
    boto3 = pytest.importorskip("boto3", reason="provider s3 needs boto3 (pluginmon[s3])")
    key_id = os.environ.get("PLUGINMON_TEST_S3_ACCESS_KEY_ID", "test")
    secret = os.environ.get("PLUGINMON_TEST_S3_SECRET_ACCESS_KEY", "test")
    region = os.environ.get("PLUGINMON_TEST_S3_REGION", "us-east-1")
    name = os.environ.get("PLUGINMON_TEST_S3_BUCKET", "pluginmon-test")
    client = boto3.client(
        "s3",
        endpoint_url=ENDPOINT,
        region_name=region,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
    )
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if name not in existing:
        client.create_bucket(Bucket=name)
    reader = S3Reader(
        endpoint_url=ENDPOINT,
        region=region,
        access_key_id=key_id,
        secret_access_key=lambda: secret,
        buckets=(name,),
    )
    return Bucket(client, name, reader)


def test_s3_verifies_and_catches_a_corrupted_byte(bucket: Bucket) -> None:
    import asyncio

    key = f"backups/{uuid.uuid4().hex}.tar"
    data = os.urandom(3 * (1 << 20) + 7)
    expected = Expected(size_bytes=len(data), sha256_hex=hashlib.sha256(data).hexdigest())
    bucket.client.put_object(Bucket=bucket.name, Key=key, Body=data)
    url = f"s3://{bucket.name}/{key}"
    try:
        good = asyncio.run(bucket.reader.verify(url, expected))
        assert (good.result, good.status) == (ReadResult.VERIFIED, VerifyStatus.VERIFIED), good
        corrupted = bytearray(data)
        corrupted[2 * (1 << 20) + 1] ^= 0x04
        bucket.client.put_object(Bucket=bucket.name, Key=key, Body=bytes(corrupted))
        bad = asyncio.run(bucket.reader.verify(url, expected))
        assert (bad.result, bad.status, bad.transient) == (
            ReadResult.CHECKSUM_MISMATCH,
            VerifyStatus.FAILED,
            False,
        )
        missing = asyncio.run(bucket.reader.verify(url + ".gone", expected))
        assert (missing.result, missing.status) == (ReadResult.NOT_FOUND, VerifyStatus.FAILED)
    finally:
        bucket.client.delete_object(Bucket=bucket.name, Key=key)


def test_s3_unreachable_endpoint_is_transient() -> None:
    pytest.importorskip("boto3", reason="provider s3 needs boto3 (pluginmon[s3])")
    import asyncio
    import socket

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reader = S3Reader(
        endpoint_url=f"http://127.0.0.1:{port}",
        region="us-east-1",
        access_key_id="x",
        secret_access_key=lambda: "y",
        buckets=("b",),
    )
    outcome = asyncio.run(reader.verify("s3://b/k", Expected(size_bytes=1, sha256_hex="0" * 64)))
    assert (outcome.result, outcome.status, outcome.transient) == (
        ReadResult.UNREACHABLE,
        VerifyStatus.UNVERIFIABLE,
        True,
    )
