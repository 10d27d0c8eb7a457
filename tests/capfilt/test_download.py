"""`capfilt download` end to end: real img2dataset against an HTTP server on 127.0.0.1.

The server serves images generated here, a page that is not an image and 404s; it records every
request so the tests also show what was (and was not) fetched. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import functools
import http.server
import io
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.config import DownloadConfig

REPO = Path(__file__).resolve().parents[2]

# name -> (size, format): the images the server holds.
IMAGES = {
    "red.png": ((100, 80), "PNG"),
    "blue.jpg": ((60, 90), "JPEG"),
    "green.png": ((48, 48), "PNG"),
    "huge.png": ((1200, 1000), "PNG"),  # over the pixel limit the tests set
}
COLORS = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20), "huge": (9, 9, 9)}


class _Handler(http.server.SimpleHTTPRequestHandler):
    requested: list[str]

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.requested.append(self.path)
        super().do_GET()

    def log_message(self, *args) -> None:  # keep pytest output readable
        pass


@pytest.fixture()
def server(tmp_path, monkeypatch):
    """(base URL, list of requested paths) of a server on 127.0.0.1 serving generated files."""
    # urllib would send even 127.0.0.1 through a configured proxy; the workers inherit this.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    root = tmp_path / "www"
    root.mkdir()
    for name, (size, fmt) in IMAGES.items():
        Image.new("RGB", size, COLORS[name.split(".")[0]]).save(root / name, fmt)
    (root / "page.html").write_text("<html><body>not an image</body></html>")
    requested: list[str] = []
    handler = type("Handler", (_Handler,), {"requested": requested})
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", requested
    httpd.shutdown()
    httpd.server_close()


def _read_all(out: Path) -> pa.Table:
    shards = sorted(out.glob("*.parquet"))
    assert shards, f"no shards in {out}"
    return pa.concat_tables([pq.read_table(p) for p in shards])


FAST = ["--set", "download.processes=1", "--set", "download.threads=4",
        "--set", "download.timeout=5"]


def test_download_accounts_for_every_url_and_keeps_columns(server, tmp_path):
    base, requested = server
    rows = [  # (url, caption, source_id)
        (f"{base}/red.png", "a red picture", 1),
        (f"{base}/blue.jpg", "a blue picture", 2),
        (f"{base}/missing.jpg", "gone", 3),
        (f"{base}/page.html", "html, not an image", 4),
        (f"file://{tmp_path}/www/red.png", "a local file", 5),  # an image, were it read
        (f"{base}/huge.png", "too many pixels", 6),
        (f"{base}/green.png", "a green picture", 7),
    ]
    url_list = tmp_path / "urls.parquet"
    pq.write_table(pa.table({
        "image_url": [r[0] for r in rows],
        "alt": [r[1] for r in rows],
        "source_id": pa.array([r[2] for r in rows], pa.int64()),
        "lang": ["en"] * len(rows),
    }), url_list)
    out = tmp_path / "out"
    args = ["download", str(url_list), str(out), "--image-size", "32", *FAST,
            "--set", "download.url_col=image_url", "--set", "download.caption_col=alt",
            "--set", "download.resize_mode=center_crop", "--set", "download.rows_per_shard=4",
            "--set", "download.max_pixels=1000000"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "read 7 URLs: 3 success, 4 failed in 2 shard(s)" in result.output
    assert "HTTP Error 404" in result.output  # the failure reasons are printed

    assert sorted(p.name for p in out.glob("*.parquet")) == ["00000.parquet", "00001.parquet"]
    table = _read_all(out)
    assert table.num_rows == len(rows)
    by_url = {r["url"]: r for r in table.to_pylist()}
    assert sorted(by_url) == sorted(r[0] for r in rows)  # every URL in exactly one row
    assert len(set(table["key"].to_pylist())) == len(rows)

    for url, caption, source_id in rows:  # captions and extra columns preserved, per URL
        assert by_url[url]["caption"] == caption
        assert by_url[url]["source_id"] == source_id
        assert by_url[url]["lang"] == "en"
    assert table.schema.field("source_id").type == pa.int64()

    for name in ("red.png", "blue.jpg", "green.png"):
        row = by_url[f"{base}/{name}"]
        assert row["status"] == "success", row["error_message"]
        assert row["error_message"] is None
        image = Image.open(io.BytesIO(row["jpg"]))
        image.load()
        assert image.format == "JPEG" and image.size == (32, 32)
        assert (row["width"], row["height"]) == (32, 32)
        assert (row["original_width"], row["original_height"]) == IMAGES[name][0]
        r, g, b = image.convert("RGB").getpixel((16, 16))  # the right picture under the URL
        assert max((r, g, b)) == {"red": r, "blue": b, "green": g}[name.split(".")[0]]
        assert len(row["sha256"]) == 64

    failed = {
        "missing.jpg": ("failed_to_download", "404"),
        "page.html": ("failed_to_resize", "decod"),
        "huge.png": ("failed_to_resize", "CV_IO_MAX_IMAGE_PIXELS"),
    }
    for name, (status, reason) in failed.items():
        row = by_url[f"{base}/{name}"]
        assert row["status"] == status and reason in row["error_message"], row
        assert row["jpg"] is None
    local = by_url[f"file://{tmp_path}/www/red.png"]
    assert local["status"] == "failed_to_download" and "scheme 'file'" in local["error_message"]
    assert local["jpg"] is None and local["sha256"] is None  # the local file was never read

    # Only the http URLs were fetched, each once; the file:// URL never reached urllib.
    assert sorted(requested) == sorted(
        "/" + name for name in ("red.png", "blue.jpg", "missing.jpg", "page.html", "huge.png",
                                "green.png"))
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["download"]["image_size"] == 32
    assert resolved["download"]["url_col"] == "image_url"

    # Running again into the same folder resumes: nothing is fetched, the shards are unchanged.
    requested.clear()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert requested == []
    assert _read_all(out).equals(table)


def test_txt_list_keeps_odd_urls_and_has_no_captions(server, tmp_path):
    from capfilt.download import download

    base, _ = server
    # A comma inside a URL is legal; img2dataset's own .txt reader would split it as CSV.
    urls = [f"{base}/red.png?size=1,2", f"{base}/nothing-here.png"]
    url_list = tmp_path / "urls.txt"
    url_list.write_text("\n".join([urls[0], "", urls[1], ""]) + "\n")
    cfg = DownloadConfig(image_size=16, resize_mode="border", processes=1, threads=2, timeout=5)
    summary = download(url_list, tmp_path / "out", cfg)
    assert (summary.read, summary.success, summary.failed) == (2, 1, 1)
    table = _read_all(tmp_path / "out")
    assert table["url"].to_pylist() == urls  # shards are sorted by key, i.e. list order
    assert table["caption"].null_count == 2
    assert table["status"].to_pylist() == ["success", "failed_to_download"]
    assert Image.open(io.BytesIO(table["jpg"][0].as_py())).size == (16, 16)


def test_rows_img2dataset_did_not_write_are_added_back(tmp_path):
    """A crashed sample or shard leaves rows out of img2dataset's parquet; they come back failed."""
    from capfilt.download import _reconcile_shard, _shard_keys, shard_schema

    cfg = DownloadConfig(rows_per_shard=3)
    inputs = pa.table({"url": ["http://a/1", "http://a/2", "http://a/3"],
                       "caption": ["one", "two", "three"], "extra": [10, 20, 30]})
    target = shard_schema(inputs.schema, cfg)
    keys = _shard_keys(2, 3, cfg)
    assert keys == ["000020", "000021", "000022"]  # img2dataset's own key format
    # img2dataset wrote only the second row of shard 2.
    written = {name: [None] for name in target.names}
    written.update(url=["http://a/2"], caption=["two"], extra=[20], key=[keys[1]],
                   status=["success"], jpg=[b"\xff\xd8"])
    pq.write_table(pa.table(written, schema=target), tmp_path / "00002.parquet")

    path = _reconcile_shard(2, inputs, {}, tmp_path, cfg)
    table = pq.read_table(path)
    assert table.schema.equals(target)
    assert table["key"].to_pylist() == keys
    assert table["status"].to_pylist() == ["failed_to_download", "success", "failed_to_download"]
    assert table["caption"].to_pylist() == ["one", "two", "three"]
    assert table["extra"].to_pylist() == [10, 20, 30]
    assert "img2dataset wrote no row" in table["error_message"][0].as_py()

    # A shard that is missing altogether: every row is failed with the reason.
    path = _reconcile_shard(5, inputs, {1: "refused: empty URL"}, tmp_path, cfg)
    table = pq.read_table(path)
    assert table["status"].to_pylist() == ["failed_to_download"] * 3
    assert table["error_message"][1].as_py() == "refused: empty URL"
    assert "wrote no shard" in table["error_message"][0].as_py()


def test_folder_holding_another_list_is_refused(tmp_path):
    from capfilt.download import DownloadError, _reconcile_shard, download

    url_list = tmp_path / "urls.txt"
    url_list.write_text("http://127.0.0.1:9/a.jpg\n")
    (tmp_path / "manifest.json").write_text("{}")  # e.g. a CapFilt output folder
    with pytest.raises(DownloadError, match="manifest.json"):
        download(url_list, tmp_path, DownloadConfig())

    cfg = DownloadConfig(rows_per_shard=10)
    first = pa.table({"url": ["http://a/1"], "caption": ["x"]})
    _reconcile_shard(0, first, {}, tmp_path, cfg)
    other = pa.table({"url": ["http://b/1"], "caption": ["x"]})
    with pytest.raises(DownloadError, match="another URL list"):
        _reconcile_shard(0, other, {}, tmp_path, cfg)


def test_tsv_list_keeps_free_text_captions(tmp_path):
    from capfilt.download import read_url_list

    url_list = tmp_path / "urls.tsv"
    url_list.write_text('url\tcaption\tscore\n'
                        ' http://x/1.jpg \tsaid "hi\t0.5\n'  # a stray quote, padded URL
                        'http://x/2.jpg\t12\t0.25\n')
    table = read_url_list(url_list, DownloadConfig())
    assert table.column_names == ["url", "caption", "score"]
    assert table["url"].to_pylist() == ["http://x/1.jpg", "http://x/2.jpg"]
    assert table["caption"].to_pylist() == ['said "hi', "12"]  # text, even when numeric
    assert table["score"].to_pylist() == [0.5, 0.25]


@pytest.mark.parametrize("content, args, message", [
    ("link,caption\nhttp://x/1.jpg,a\n", [], "column 'url' (download.url_col) is missing"),
    ("url,caption,status\nhttp://x/1.jpg,a,ok\n", [], "['status'] collide"),
    ("url,caption\n", [], "holds no URLs"),
    ("url,caption\nhttp://x/1.jpg,a,extra field\n", [], "cannot be read as csv"),
    ("url,caption\nhttp://x/1.jpg,a\n", ["--set", "download.threads=0"],
     "download.threads must be at least 1"),
    ("url,caption\nhttp://x/1.jpg,a\n", ["--set", "download.treads=4"],
     "unknown config key download.treads"),
])
def test_bad_input_is_a_clear_error(tmp_path, content, args, message):
    url_list = tmp_path / "urls.csv"
    url_list.write_text(content)
    result = CliRunner().invoke(app, ["download", str(url_list), str(tmp_path / "out"), *args])
    assert result.exit_code == 1
    assert message in result.output
    assert not (tmp_path / "out").exists()  # refused before anything was started or written


def test_docker_files_are_consistent():
    """No Docker engine here: the image and the RayJob are kept valid by these checks."""
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-py311-gpu" in dockerfile
    assert "pip install" in dockerfile and "USER ray" in dockerfile
    manifests = list(yaml.safe_load_all((REPO / "docker" / "rayjob.yaml").read_text()))
    job = next(m for m in manifests if m["kind"] == "RayJob")
    assert job["apiVersion"].startswith("ray.io/")
    assert job["spec"]["entrypoint"].startswith("capfilt bootstrap")
    assert "run.resources.address=auto" in job["spec"]["entrypoint"]
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    head = cluster["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # dashboard stays in the cluster
    groups = [head["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    gpu_workers = [
        g for g in cluster["workerGroupSpecs"]
        if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
               for c in g["template"]["spec"]["containers"])
    ]
    assert gpu_workers, "no GPU worker group"
    claims = {m["metadata"]["name"] for m in manifests if m["kind"] == "PersistentVolumeClaim"}
    for template in groups:
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        for container in template["spec"]["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "/data" in mounts, container["name"]
            claim = volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"]
            assert claim in claims


def test_the_object_storage_rayjob_needs_no_shared_filesystem():
    """docker/rayjob-s3.yaml: input and output on S3, models staged per pod, no volume claim."""
    [job] = list(yaml.safe_load_all((REPO / "docker" / "rayjob-s3.yaml").read_text()))
    entry = job["spec"]["entrypoint"]
    assert entry.startswith("capfilt run --address auto") and "--input s3://" in entry and "--out s3://" in entry
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for template in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        spec = template["spec"]
        assert all("persistentVolumeClaim" not in v for v in spec["volumes"])  # nothing shared between pods
        [stage] = spec["initContainers"]
        assert stage["args"][:2] == ["s3", "sync"] and stage["args"][-1] == "/models"
        for container in spec["containers"] + spec["initContainers"]:
            assert {"secretRef": {"name": "capfilt-s3"}} in container["envFrom"]  # credentials from a secret
            assert {"name": "models", "mountPath": "/models"} in container["volumeMounts"]
        assert spec["securityContext"]["runAsNonRoot"] is True
    assert "--captioner /models/captioner --filter /models/filter" in entry


def test_download_into_object_storage_uploads_whole_shards_and_resumes(server, s3, tmp_path):
    import boto3

    from capfilt.storage import location

    base, requested = server
    url_list = tmp_path / "urls.txt"
    url_list.write_text(f"{base}/red.png\n{base}/missing.jpg\n{base}/blue.jpg\n")
    bucket = s3.bucket()
    dest = f"s3://{bucket}/web"
    args = ["download", str(url_list), dest, "--image-size", "32", *FAST, "--set", "download.rows_per_shard=2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "read 3 URLs: 2 success, 1 failed in 2 shard(s)" in result.output
    keys = sorted(o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == ["web/00000.parquet", "web/00000_stats.json", "web/00001.parquet", "web/00001_stats.json",
                    "web/config.yaml"]
    table = pa.concat_tables([location(f"{dest}/0000{i}.parquet").read_table() for i in range(2)])
    assert sorted(table["url"].to_pylist()) == sorted(f"{base}/{n}" for n in ("red.png", "missing.jpg", "blue.jpg"))
    assert sorted(table["status"].to_pylist()) == ["failed_to_download", "success", "success"]

    # Uploaded shards are done: the same command again fetches nothing and leaves them as they are.
    requested.clear()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert requested == [] and "read 3 URLs: 2 success, 1 failed" in again.output


def test_download_into_object_storage_through_faults(server, fault_proxy, s3, tmp_path):
    """Throttling, 5xx and dropped connections on the uploads are retried; uploads that keep failing
    stop the download with one error naming the object, and the re-run fetches only that shard."""
    from capfilt.storage import location
    from tests.s3_fault_proxy import Rule

    base, requested = server
    url_list = tmp_path / "urls.txt"
    url_list.write_text(f"{base}/red.png\n{base}/missing.jpg\n{base}/blue.jpg\n")
    bucket = s3.bucket()
    args = ["download", str(url_list), f"s3://{bucket}/web", "--image-size", "32", *FAST, "--set",
            "download.rows_per_shard=2", "--set", "storage.backoff_s=0.01", "--set", "storage.max_backoff_s=0.02",
            "--set", "storage.request_attempts=1", "--set", "storage.attempts=6"]
    fault_proxy.rules = [Rule({"internal": 1.0}, methods=("PUT", "POST"), prefix=f"{bucket}/web/00001"),  # for good
                         Rule({"slowdown": 1.0}, methods=("PUT", "POST"), prefix=f"{bucket}/web/", limit=3),
                         Rule({"reset": 1.0}, prefix=f"{bucket}/web/", limit=2)]
    result = CliRunner().invoke(app, args)
    fault_proxy.rules = []
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1, result.output
    assert errors[0].startswith(f"error: PUT s3://{bucket}/web/00001.parquet failed 6 times") and \
        "INTERNAL_FAILURE" in errors[0] and errors[0].endswith("re-run the same command to resume"), errors[0]
    assert fault_proxy.counts["slowdown"] == 3 and fault_proxy.counts["reset"] >= 2
    # shard 00000 went up through the faults; 00001 has neither its file nor the stats that mark it done
    assert sorted(info.base_name for info in location(f"s3://{bucket}/web").files()) == \
        ["00000.parquet", "00000_stats.json"]

    requested.clear()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(requested) == ["/blue.jpg"]  # only the missing shard's URL is fetched again
    assert sorted(info.base_name for info in location(f"s3://{bucket}/web").files()) == \
        ["00000.parquet", "00000_stats.json", "00001.parquet", "00001_stats.json", "config.yaml"]
    table = pa.concat_tables([location(f"s3://{bucket}/web/0000{i}.parquet").read_table() for i in range(2)])
    assert sorted(table["url"].to_pylist()) == sorted(f"{base}/{n}" for n in ("red.png", "missing.jpg", "blue.jpg"))
