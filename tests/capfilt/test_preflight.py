"""Errors a user causes on object storage are caught before any work: one `error:` line, exit 1,
nothing written, no Ray and no model. A moto server that checks keys and IAM policies (as S3 does)."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from capfilt import storage
from capfilt.cli import app
from capfilt.preflight import cause
from tests.s3_server import S3Server
from tests.tiny_blip import shard_rows, write_shard


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A bucket with two input shards under `in/`, keys of four kinds, auth on; stopped at the end."""
    server = S3Server()
    try:
        bucket = server.bucket()
        client = server._client("s3")
        local = tmp_path_factory.mktemp("preflight-in")
        for i in range(2):
            write_shard(local / f"{i:05d}.parquet", shard_rows(f"p{i}", 3, seed=i))
            client.put_object(Bucket=bucket, Key=f"in/{i:05d}.parquet", Body=(local / f"{i:05d}.parquet").read_bytes())
        keys = {"admin": server.user_keys("admin", ["s3:*"]),
                # moto authorises a HEAD as s3:HeadObject
                "readonly": server.user_keys("readonly", ["s3:Get*", "s3:List*", "s3:HeadObject"]),
                "listonly": server.user_keys("listonly", ["s3:List*"])}
        server.require_auth()
        yield server, bucket, keys
    finally:
        server.stop()


def objects(server: S3Server, bucket: str, keys: dict) -> list[str]:
    import boto3

    env = keys["admin"]
    client = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


@pytest.fixture()
def as_user(store, monkeypatch):
    """Switch this process's S3 environment to one set of keys (or none)."""

    def switch(env: dict[str, str], drop: tuple[str, ...] = ()) -> None:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        for name in drop:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
        monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
        storage.configure(storage.settings())  # S3 clients are rebuilt from the new environment

    yield switch
    monkeypatch.undo()
    storage.configure(storage.settings())


@pytest.fixture()
def no_work(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a storage error must be caught before Ray starts or a model loads")

    monkeypatch.setattr("capfilt.pipelines.run.start_ray", forbidden)
    monkeypatch.setattr("capfilt.pipelines.run.build_dataset", forbidden)
    monkeypatch.setattr("capfilt.pipelines.ray_env.init_ray", forbidden)


def run_args(blip_dirs, inputs: str, out: str) -> list[str]:
    return ["run", "--input", inputs, "--out", out, "--captioner", str(blip_dirs["captioner"]),
            "--filter", str(blip_dirs["filter"])]


def one_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize("case", ["unknown key", "wrong secret", "no input bucket", "no output bucket",
                                  "read-only keys", "keys that cannot read", "no credentials"])
def test_a_storage_error_of_the_user_is_one_line_before_any_work(case, store, as_user, no_work, blip_dirs):
    server, bucket, keys = store
    before = objects(server, bucket, keys)
    inputs, out = f"s3://{bucket}/in", f"s3://{bucket}/out"
    env, drop = dict(keys["admin"]), ()
    expected = {
        "unknown key": rf"--input {inputs}: cannot list it: the access key is not known to the store .*"
                       r"INVALID_ACCESS_KEY_ID",
        "wrong secret": rf"--input {inputs}: cannot list it: the secret key does not match the access key",
        "no input bucket": r"--input s3://no-such-bucket-x/in: the bucket no-such-bucket-x does not exist",
        "no output bucket": r"--out s3://no-such-bucket-x/out: cannot write there: the bucket does not exist",
        "read-only keys": rf"--out {out}: cannot write there: access denied: these keys may not write here "
                          r"\(AWS Error ACCESS_DENIED\)",
        "keys that cannot read": rf"--input {inputs}: cannot read {inputs}/00000.parquet: access denied: these keys "
                                 r"may not read here",
        "no credentials": rf"--input {inputs}: cannot list it: no credentials were found",
    }[case]
    if case == "unknown key":
        env["AWS_ACCESS_KEY_ID"] = "AKIAUNKNOWNUNKNOWN00"
    elif case == "wrong secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    elif case == "no input bucket":
        inputs = "s3://no-such-bucket-x/in"
    elif case == "no output bucket":
        out = "s3://no-such-bucket-x/out"
    elif case == "read-only keys":
        env = keys["readonly"]
    elif case == "keys that cannot read":
        env = keys["listonly"]
    else:
        drop = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    as_user(env, drop)
    line = one_error(CliRunner().invoke(app, run_args(blip_dirs, inputs, out)))
    assert re.search("error: " + expected, line), line
    assert objects(server, bucket, keys) == before  # nothing written, not even the probe


def test_export_and_download_check_their_destination_first(store, as_user, no_work, tmp_path):
    server, bucket, keys = store
    before = objects(server, bucket, keys)
    as_user(keys["readonly"])
    line = one_error(CliRunner().invoke(app, ["export", f"s3://{bucket}/in", "--to", f"s3://{bucket}/export"]))
    assert line.startswith(f"error: --to s3://{bucket}/export: cannot write there: access denied"), line
    urls = tmp_path / "urls.txt"
    urls.write_text("http://127.0.0.1:9/a.jpg\n")
    line = one_error(CliRunner().invoke(app, ["download", str(urls), f"s3://{bucket}/web"]))
    assert line.startswith(f"error: OUT s3://{bucket}/web: cannot write there: access denied"), line
    assert objects(server, bucket, keys) == before


def test_a_working_store_passes(store, as_user):
    from capfilt import preflight

    server, bucket, keys = store
    before = objects(server, bucket, keys)
    as_user(keys["admin"])
    preflight.check(inputs={"--input": f"s3://{bucket}/in/*.parquet"}, outputs={"--out": f"s3://{bucket}/out"})
    preflight.check(outputs={"--out": f"s3://{bucket}/new/deeper/out"})
    assert objects(server, bucket, keys) == before  # the probes are gone, and no empty folder marker is left
    preflight.check(outputs={"--to": f"s3://{bucket}/in"})
    # Under a prefix that holds objects, pyarrow marks the "folder" with an empty object when it deletes one.
    assert sorted(set(objects(server, bucket, keys)) - set(before)) == ["in/"]


def test_causes_in_words():
    assert cause(OSError("AWS Error NO_SUCH_BUCKET during ListObjectsV2 operation: x"), "list") == \
        "the bucket does not exist (AWS Error NO_SUCH_BUCKET)"
    assert "no credentials" in cause(OSError("AWS Error INTERNAL_FAILURE during PutObject operation: "), "write")
    assert cause(OSError("something else"), "read") == "something else"
