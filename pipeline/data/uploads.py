"""Abandoned multipart uploads on S3. A writer killed while it uploads a large object leaves
its multipart upload open: invisible to readers, but its parts are stored (and billed) until
someone aborts it. The next writer of the same partition, holding its lock, aborts the uploads
under it before writing (`abort_uploads`), and a write that fails aborts its own.

The S3 API is reached with boto3 (optional: without it nothing is aborted) from pyarrow's URI
form: `s3://[KEY:SECRET@]bucket/key?endpoint_override=host:port&scheme=http&region=…`,
credentials otherwise from the environment as for pyarrow.
"""
from __future__ import annotations

import warnings
from urllib.parse import parse_qsl, unquote, urlsplit

from pipeline.secrets import redact


def _s3(uri: str):
    import boto3  # optional: present with the S3 extra (and moto's tests)
    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query))
    kwargs = {}
    if "endpoint_override" in query:
        endpoint = query["endpoint_override"]
        kwargs["endpoint_url"] = endpoint if "://" in endpoint else \
            f"{query.get('scheme', 'https')}://{endpoint}"
    if "region" in query:
        kwargs["region_name"] = query["region"]
    if parts.username:
        kwargs["aws_access_key_id"] = unquote(parts.username)
        kwargs["aws_secret_access_key"] = unquote(parts.password or "")
    s3 = boto3.session.Session().client
    return s3("s3", **kwargs)


def abort_uploads(uri: str, folder: bool = True) -> int:
    """Abort the multipart uploads in progress under the s3:// folder `uri` (folder=False: of
    the object `uri` itself). Call it holding the lock of what is under it: any upload there
    is a dead writer's. Other URIs, or no boto3: 0. A failure is a warning, never an error
    (the write goes on). Returns how many were aborted."""
    if not uri.startswith("s3://"):
        return 0
    parts = urlsplit(uri)
    bucket, key = parts.hostname, parts.path.lstrip("/")
    prefix = key.rstrip("/") + "/" if folder else key
    n = 0
    try:
        s3 = _s3(uri)
        for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket,
                                                                         Prefix=prefix):
            for up in page.get("Uploads", []):
                if folder or up["Key"] == key:
                    s3.abort_multipart_upload(Bucket=bucket, Key=up["Key"],
                                              UploadId=up["UploadId"])
                    n += 1
    except ImportError:
        return 0
    except Exception as e:  # noqa: BLE001 - cleaning up must never fail the write
        warnings.warn(f"could not abort the multipart uploads under {redact(uri)} "
                      f"({type(e).__name__}: {redact(str(e))[:200]})", stacklevel=2)
    return n
