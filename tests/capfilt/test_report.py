"""`capfilt report`: a bootstrap workdir and a single run render, captions are escaped, and
headless Chromium loads the page with no errors, no request outside it and every image decoded."""

from __future__ import annotations

import base64
import html
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from capfilt import audit, report, schema
from capfilt.config import load_config, write_resolved
from tests.tiny_blip import image_bytes

EVIL = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'


def _output_table(keys, captions, images, itm, synthetic, synth_itm, threshold=0.5):
    n = len(keys)
    return pa.table({
        "key": pa.array(keys, pa.string()),
        "caption": pa.array(captions, pa.string()),
        "jpg": pa.array(images, pa.binary()),
        "status": pa.array(["success"] * n, pa.string()),
        schema.CAPTION_ITM: pa.array(itm, pa.float32()),
        schema.CAPTION_KEEP: pa.array([s is not None and s >= threshold for s in itm], pa.bool_()),
        schema.SYNTHETIC: pa.array(synthetic, pa.list_(pa.string())),
        schema.SYNTHETIC_ITM: pa.array(synth_itm, pa.list_(pa.float32())),
        schema.SYNTHETIC_KEEP: pa.array([[s >= threshold for s in row] for row in synth_itm], pa.list_(pa.bool_())),
        schema.THRESHOLD: pa.array([threshold] * n, pa.float32()),
    })


def make_run(run: Path, seed: int, n: int = 10) -> dict:
    """A CapFilt run dir: data/ rows keep something, rejected/ rows keep nothing, one failed row."""
    keys = [f"{seed:03d}{i:06d}" for i in range(n)]
    captions = [f"web caption {i} of round {seed}" for i in range(n)]
    captions[1] = EVIL
    itm = [round(0.1 + 0.8 * ((i * 7 + seed) % n) / n, 3) for i in range(n)]
    synthetic = [[f"a synthetic caption {i}"] for i in range(n)]
    synthetic[2] = [EVIL.replace("pwned", "synthetic")]
    synth_itm = [[round(0.3 + 0.65 * ((i * 3 + seed) % n) / n, 3)] for i in range(n)]
    keep = [itm[i] >= 0.5 or synth_itm[i][0] >= 0.5 for i in range(n)]
    images = [image_bytes(seed * 100 + i, size=64) for i in range(n)]
    cols = (keys, captions, images, itm, synthetic, synth_itm)
    kept = [i for i in range(n) if keep[i]]
    dropped = [i for i in range(n) if not keep[i]]
    for sub, rows in ((schema.DATA, kept), (schema.REJECTED, dropped)):
        (run / sub).mkdir(parents=True, exist_ok=True)
        pq.write_table(_output_table(*[[c[i] for i in rows] for c in cols]), run / sub / "00000.parquet")
    (run / schema.FAILED).mkdir(parents=True, exist_ok=True)
    failed = _output_table(["zz"], ["x"], [None], [None], [[]], [[]])
    pq.write_table(failed, run / schema.FAILED / "00000.parquet")
    stats = {"read": n + 1, "kept": len(kept), "rejected": len(dropped), "failed": 1,
             "synthetic_generated": n, "synthetic_kept": sum(s[0] >= 0.5 for s in synth_itm),
             "web_kept": sum(s >= 0.5 for s in itm), "failed_by_reason": {"download": 1}}
    (run / "stats.json").write_text(json.dumps(stats))
    write_resolved(load_config(), run)
    return stats


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Three rounds: two complete, the last with an eval.json but no CapFilt output yet."""
    root = tmp_path_factory.mktemp("bootstrap")
    for r in range(2):
        make_run(root / f"round-{r}" / "capfilt", seed=r)
    for r in range(3):
        (root / f"round-{r}").mkdir(exist_ok=True)
        metrics = {"retrieval": {"itm": {"mean_recall": 0.2 + 0.1 * r}, "itc": {"mean_recall": 0.1 + 0.1 * r}},
                   "captioning": {"bleu_4": 0.1 * r, "cider_d": 0.5 * r, "examples": [{"generated": EVIL}]},
                   "filter": {"roc_auc": 0.6 + 0.1 * r}}
        (root / f"round-{r}" / "eval.json").write_text(json.dumps(metrics))
    (root / "round-1" / "audit.json").write_text(json.dumps(audit_result()))
    return root


def audit_result() -> dict:
    """`capfilt audit`'s JSON from planted scores, with the captioner warning (synthetic < human)."""
    rng = np.random.default_rng(0)
    clean, shuffled = rng.beta(6, 2, 200), rng.beta(2, 6, 200)
    web = np.r_[rng.beta(6, 2, 70), rng.beta(2, 6, 30)]
    result = audit.filter_audit(clean, shuffled, 0.5, 0.9, web)
    human = [f"human caption {i}" for i in range(4)]
    result["captioner"] = audit.captioner_audit(human, clean[:4], [[EVIL]] * 4, [[0.1]] * 4, 0.5)
    result["warnings"] = [result["captioner"]["warning"]]
    result["scorers"] = {"clip": {"model": "/m/<clip>"} | audit.scorer_audit(clean - 0.3, shuffled - 0.3, 0.2, 0.9),
                         "sig": {"model": "/m/sig"} | audit.scorer_audit(clean, shuffled[::-1], None, 0.9)}
    return result


def test_bootstrap_report_renders_every_part(workdir, tmp_path):
    page = report.render(workdir, examples=6)
    assert page.count("<h2>round-") == 3
    assert "no CapFilt output in this round" in page  # round-2 has only eval.json
    assert page.count("<svg") == 2 + 5 + 2  # two histograms, five headline metrics, round-1's audit plots
    assert page.count("Filter audit") == 1 and page.count('class="warning">WARNING: the captioner') == 1
    assert 'aria-label="keep rate vs threshold"' in page and "shuffled caption (200)" in page
    estimates = audit_result()["at_threshold"]
    assert f"<td>{estimates['recall']:.4f}</td>" in page and f"<td>{estimates['precision']:.4f}</td>" in page
    assert "threshold 0.50" in page
    assert page.count('<div class="card">') == 12
    assert 'class="removed"' in page and 'class="kept"' in page
    assert "retrieval.itm.mean_recall" in page and "0.4000" in page  # round-2 value in the table
    assert page.count("data:image/png;base64,") == 12



def test_report_shows_figures_with_standard_errors_and_the_synthetic_decision(tmp_path):
    def round_eval(r, tr1, cider):
        return {"round": r, "retrieval": {"n": 100, "itm": {"i2t_r1": tr1, "t2i_r1": 0.05}},
                "captioning": {"cider_d": cider, "cider_d_se": 0.04, "bleu_4": 0.07,
                               "attributes": {"recall": 0.38, "recall_se": 0.015}}}

    for r, (tr1, cider) in enumerate([(0.06, 0.53), (0.05, 0.75)]):
        (tmp_path / f"round-{r}").mkdir()
        external = {"captioner": {"model": "/m/<llava>", "fine_tuned": False}} if r else {}
        (tmp_path / f"round-{r}" / "eval.json").write_text(json.dumps(round_eval(r, tr1, cider) | external))
    result = audit_result() | {"warnings": []}
    result["synthetic_decision"] = audit.synthetic_decision(result["captioner"])
    result["keep_policy"] = {"configured": "auto", "run": "web"}
    (tmp_path / "round-1" / "audit.json").write_text(json.dumps(result))
    page = html.unescape(report.render(tmp_path))
    assert "<td>0.060 ± 0.024</td><td>0.050 ± 0.022</td>" in page  # TR@1, sqrt(p (1 - p) / 100)
    assert "<td>CIDEr</td><td>+0.220 ± 0.057</td><td>gain</td>" in page
    assert "<td>TR@1</td><td>-0.010 ± 0.032</td><td>within noise</td>" in page
    assert "Synthetic captions (run.filter.keep=auto → web)</b>: synthetic captions left out: " in page
    assert "P(match) gap per image, synthetic - human (± SE)" in page
    assert page.count("Synthetic captions by the external captioner /m/<llava>, used as it is (not fine-tuned)") == 1

def test_report_shows_each_scorer_of_each_round_audit(tmp_path):
    """A table per round's audit with scorers: name, model, ROC-AUC, the clean keep rate at its
    threshold and the threshold for the target keep rate; a CLIP --filter's audit says whose score
    its figures are and what does not apply."""
    first = audit_result()
    second = audit_result()
    second["scorers"] = {"filter": {"model": "/m/clip2"} | audit.scorer_audit([0.3, 0.4, 0.5], [0.1, 0.35, 0.2],
                                                                               0.35, 0.6)}
    second["filter_score"] = schema.score_column("filter")
    second["not_applicable"] = {"synthetic_decision": "run.filter.keep=auto decides by a BLIP filter's ITM P(match)"}
    for r, result in enumerate([first, second, {k: v for k, v in first.items() if k != "scorers"}]):
        (tmp_path / f"round-{r}").mkdir()
        (tmp_path / f"round-{r}" / "audit.json").write_text(json.dumps(result))
    raw = report.render(tmp_path)
    assert "/m/&lt;clip&gt;" in raw and "/m/<clip>" not in raw  # a model path is text too
    page = html.unescape(raw)
    assert page.count("Named scorers") == 2  # round-2's audit has none
    assert "<th>threshold keeping 90% of clean pairs</th>" in page and "<th>threshold keeping 60% of" in page

    def row(name, figures):
        at = figures["at_threshold"]
        cells = [name, figures["model"], f"{figures['roc_auc']:.4f}",
                 "–" if at is None else f"{figures['threshold']:.4f}",
                 "–" if at is None else f"{at['clean_keep_rate']:.4f}",
                 f"{figures['at_target']['threshold']:.4f}", f"{figures['at_target']['clean_keep_rate']:.4f}"]
        return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"

    for result in (first, second):
        for name, figures in result["scorers"].items():
            assert row(name, figures) in page
    # By hand: 8 of the 9 clean-shuffled pairs ranked right; 0.35 keeps 2 of 3 clean; the lower 40% quantile
    # 0.3 keeps all 3.
    assert "<tr><td>filter</td><td>/m/clip2</td><td>0.8889</td><td>0.3500</td><td>0.6667</td><td>0.3000</td>" \
           "<td>1.0000</td></tr>" in page
    # The CLIP --filter's round: its figures are of score_filter, and keep=auto's decision does not apply.
    assert page.count("by filter score (score_filter)") == 1 and page.count("filter score (score_filter)</text>") == 1
    assert "synthetic_decision: not applicable: run.filter.keep=auto decides by a BLIP filter's ITM" in page
    assert "<td>mean filter score (score_filter)</td>" in page and page.count("<td>mean filter P(match)</td>") == 2


def test_untrusted_captions_are_escaped(workdir):
    page = report.render(workdir, examples=10)
    assert "<script" not in page.lower()  # no script at all, and none smuggled in by a caption
    assert "<img src=x" not in page  # the caption's tag is text, not an element
    assert html.escape(EVIL, quote=True) in page
    assert "default-src 'none'" in page  # and the CSP forbids scripts if escaping were ever missed


def test_single_run_dir_and_cli(tmp_path):
    from capfilt.cli import app

    stats = make_run(tmp_path / "run", seed=5)
    res = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "r.html").read_text()
    assert f"<td>{stats['read']}</td>" in page and "Evaluation across rounds" not in page
    assert "Filter audit" not in page
    (tmp_path / "run" / "audit.json").write_text(json.dumps(audit_result()))  # `capfilt audit --out RUN/audit.json`
    assert "Filter audit" in report.render(tmp_path / "run")
    (tmp_path / "run" / "audit.json").write_text(json.dumps({"roc_auc": 0.5}))
    assert "audit.json not in the form capfilt audit writes" in report.render(tmp_path / "run")
    # Without stats.json the counts come from the parquet footers.
    (tmp_path / "run" / "stats.json").unlink()
    page = report.render(tmp_path / "run")
    assert f"<td>{stats['read']}</td><td>{stats['kept']}</td>" in page
    bad = CliRunner().invoke(app, ["report", str(tmp_path / "nothing-here")])
    assert bad.exit_code == 1 and "no such directory" in bad.output


def test_a_run_without_a_blip_filter_shows_the_score_it_decided_by(tmp_path):
    """A CLIP --filter run: caption_itm is null, score_filter (a cosine, negative too) decided."""
    run = tmp_path / "run"
    web, synthetic = [-0.35, 0.1, 0.45], [[0.5], [-0.2], [0.05]]
    n = len(web)
    table = _output_table([f"k{i}" for i in range(n)], [f"web caption {i}" for i in range(n)],
                          [image_bytes(i, size=64) for i in range(n)], [None] * n,
                          [[f"synthetic {i}"] for i in range(n)], [[] for _ in range(n)])
    table = table.append_column(schema.score_column("filter"), pa.array(web, pa.float32()))
    table = table.append_column(schema.synthetic_score_column("filter"), pa.array(synthetic, pa.list_(pa.float32())))
    (run / schema.DATA).mkdir(parents=True)
    pq.write_table(table, run / schema.DATA / "00000.parquet")
    cfg = load_config(None, ["run.filter.model=", "run.filter.threshold=null",
                             "run.scorers=[{name: filter, model: /models/clip-vit, threshold: 0.25}]"])
    write_resolved(cfg, run)
    page = report.render(run)
    assert "<h3>filter score (clip-vit) of the captions scored</h3>" in page
    assert "filter score (clip-vit) in parentheses" in page
    assert "(-0.35)" in page and "(0.45)" in page  # each caption's own score in the gallery
    assert ">-1.0</text>" in page  # a negative cosine widens the axis to [-1, 1]
    assert 'aria-label="filter score (clip-vit) histogram"' in page
    assert "threshold 0.25" in page and "threshold 0.50" not in page  # the scorer's, not ITM's column


# ---------------------------------------------------------------------------------------------
# Headless Chromium over the DevTools protocol on a pipe (fds 3/4): no port, no network.


class DevTools:
    def __init__(self, binary: str, profile: Path):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        # Chromium reads commands on fd 3 and writes replies on fd 4. A one-line Python wrapper moves
        # the pipe ends there and execs it (no preexec_fn: unsafe in a process with threads, e.g. Ray's).
        # It dups both ends first so neither overwrites the other, and marks 3 and 4 inheritable
        # because dup2 onto the fd a dup already has leaves it close-on-exec.
        wire = ("import os, sys; a, b = os.dup(int(sys.argv[1])), os.dup(int(sys.argv[2])); "
                "os.dup2(a, 3); os.dup2(b, 4); os.set_inheritable(3, True); os.set_inheritable(4, True); "
                "os.execv(sys.argv[3], sys.argv[3:])")
        self.proc = subprocess.Popen([sys.executable, "-c", wire, str(to_chrome_r), str(from_chrome_w), binary, *args],
                                     pass_fds=(to_chrome_r, from_chrome_w), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for seen in self.events:
            if seen.get("method") == method:
                return seen
        while True:
            msg = self._read_message(deadline)
            self.events.append(msg)
            if msg.get("method") == method:
                return msg

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def chromium_load(page: Path, screenshot: Path, profile: Path) -> dict:
    """Load `page`, return its images' decode state, errors and outside requests; save a screenshot."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    tools = DevTools(binary, profile)
    try:
        target = tools.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = tools.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            tools.call(f"{domain}.enable", session=session)
        tools.call("Emulation.setDeviceMetricsOverride",
                   {"width": 1200, "height": 2000, "deviceScaleFactor": 1, "mobile": False}, session=session)
        tools.call("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        tools.wait_event("Page.loadEventFired")
        state = tools.call("Runtime.evaluate", {"returnByValue": True, "expression": """({
            images: Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]),
            scripts: document.scripts.length,
            svgs: document.querySelectorAll('svg').length,
            struck: Array.from(document.querySelectorAll('.removed')).filter(
                e => getComputedStyle(e).textDecorationLine.includes('line-through')).length,
            removed: document.querySelectorAll('.removed').length,
            text: document.body.innerText})"""}, session=session)["result"]["value"]
        shot = tools.call("Page.captureScreenshot", {"format": "png"}, session=session)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
    finally:
        tools.close()
    errors = [e for e in tools.events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    requests = [e["params"]["request"]["url"] for e in tools.events if e.get("method") == "Network.requestWillBeSent"]
    state["errors"] = errors
    state["outside_requests"] = [u for u in requests if not u.startswith(("data:", "file:", "about:"))]
    return state


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")),
                    reason="no chromium binary (Debian: apt-get install -y chromium); CI must install it")
def test_chromium_renders_report_without_errors(workdir, tmp_path):
    out = report.write_report(workdir, tmp_path / "report.html", examples=6)
    shot = Path(os.environ.get("CAPFILT_REPORT_SCREENSHOT", tmp_path / "report.png"))
    state = chromium_load(out, shot, tmp_path / "profile")
    assert state["errors"] == []
    assert state["outside_requests"] == []
    assert state["scripts"] == 0  # the <script> caption is text, not an element
    assert len(state["images"]) == 12
    assert all(complete and width > 0 and height > 0 for complete, width, height in state["images"])
    assert state["svgs"] == 9
    assert "WARNING: the captioner's captions score below" in state["text"]
    assert "keep rate vs threshold" in state["text"] and "Captioner audit" in state["text"]
    assert "Named scorers" in state["text"] and "/m/<clip>" in state["text"]
    assert state["removed"] > 0 and state["struck"] == state["removed"]  # removed captions struck through
    assert EVIL in state["text"]  # shown to the reader as the literal text it is
    assert shot.stat().st_size > 10_000
