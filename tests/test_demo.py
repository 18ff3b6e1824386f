"""The web demo (``llavaseg demo``), end to end: through Gradio's own client against a served page, and in a real
headless Chromium (Playwright), checking the page's masks are the library's and that nothing leaves 127.0.0.1.

Skipped without the ``[demo]`` extra (Gradio); the browser test is skipped without Debian's Chromium or the
playwright package, and says which is missing.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image

gr = pytest.importorskip("gradio", reason="the [demo] extra (Gradio) is not installed")
gradio_client = pytest.importorskip("gradio_client", reason="the [demo] extra (gradio_client) is not installed")

from llavaseg import SegmentationResult  # noqa: E402 - after the skips
from llavaseg.tinyworld import SAMPLE_QUERY, sample_scene  # noqa: E402

# Gradio's queue calls pandas options that pandas 3 deprecates: theirs, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "benchmarks" / "results" / "demo-screenshot.png"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mask_png(path: str | Path) -> np.ndarray:
    return np.asarray(Image.open(path)) > 127


def _text_of(message: dict) -> str:
    content = message["content"]
    items = content if isinstance(content, list) else [content]
    return " ".join(item.get("text", "") if isinstance(item, dict) else str(item) for item in items)


def _is_local(host: object) -> bool:
    return str(host) in ("localhost", "::1") or str(host).startswith("127.")


def _local_only(patch: pytest.MonkeyPatch, refused: list[str]) -> None:
    """Refuse (and record) every name lookup and connection to anywhere but this machine, in this process:
    the served page and the client both run here, so nothing either does can leave unseen."""
    lookup, connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if not _is_local(host):
            refused.append(str(host))
            raise socket.gaierror(f"the demo tests refuse to look up {host}")
        return lookup(host, *args, **kwargs)

    def guarded_connect(sock, address):
        if isinstance(address, tuple) and not _is_local(address[0]):
            refused.append(str(address[0]))
            raise OSError(f"the demo tests refuse to connect to {address[0]}")
        return connect(sock, address)

    patch.setattr(socket, "getaddrinfo", getaddrinfo)
    patch.setattr(socket.socket, "connect", guarded_connect)
    # Gradio's own client asks the Hub which "agent harness" it runs in, and sends telemetry, unless offline.
    patch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    patch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY", True)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The demo on the ``tiny`` preset (random models: fast), served on a free local port, and a client;
    ``refused`` lists every attempt to reach another machine."""
    from llavaseg.demo.app import build_app, launch
    from llavaseg.demo.session import DemoConfig, DemoSession, tiny_world_examples
    from llavaseg.models.presets import get_preset

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    refused: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        _local_only(patch, refused)
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))  # uploads and served files
        preset = get_preset("tiny")
        session = DemoSession(DemoConfig(spec=preset.spec(), label="preset tiny", allow_untrained=True,
                                         preset=preset), workdir=tmp_path_factory.mktemp("demo"))
        app = build_app(session, tiny_world_examples(session.workdir / "examples", count=1))
        _, url, share_url = launch(app, port=_free_port(), block=False, quiet=True)
        client = gradio_client.Client(url, verbose=False, analytics_enabled=False,
                                      download_files=str(tmp_path_factory.mktemp("downloads")))
        yield app, session, client, url, share_url, refused
        app.close()
    torch.set_num_threads(threads)


def test_segment_through_the_page_equals_the_library(served, tiny_segmenter):
    app, _, client, url, share_url, _ = served
    assert app.server_name == "127.0.0.1" and share_url is None and urlparse(url).hostname == "127.0.0.1"
    outputs = client.predict(gradio_client.handle_file(str(sample_scene())), SAMPLE_QUERY, "llavaseg",
                             api_name="/segment")
    overlay, status, answer, description, attributes, prompts, timings, mask_png, result_json = outputs
    expected = tiny_segmenter(sample_scene(), SAMPLE_QUERY)
    assert np.array_equal(_mask_png(mask_png), expected.mask)
    saved = SegmentationResult.model_validate_json(Path(result_json).read_text())
    assert np.array_equal(saved.mask, expected.mask) and saved.route == "llavaseg"
    assert answer == expected.answer and description == expected.description
    assert attributes["attributes"] == dict(expected.attributes.items())
    assert all(stage in prompts for stage in expected.prompts) and "total" in timings
    assert "Random weights" in status and Path(overlay).is_file()


def test_bad_uploads_and_empty_queries_give_a_message(served, tmp_path, monkeypatch):
    _, _, client, _, _, _ = served
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("not an image")
    upload = gradio_client.handle_file
    status = client.predict(upload(str(not_an_image)), SAMPLE_QUERY, "llavaseg", api_name="/segment")[1]
    assert "Could not run" in status and "not a valid image file" in status and "notes.txt" in status
    assert "/tmp/gradio" not in status  # the visitor's file name, not the server's copy
    status = client.predict(upload(str(sample_scene())), "   ", "llavaseg", api_name="/segment")[1]
    assert "type a query first" in status
    monkeypatch.setattr("llavaseg.images.MAX_PIXELS", 1000)  # the server runs in this process
    status = client.predict(upload(str(sample_scene())), SAMPLE_QUERY, "llavaseg", api_name="/segment")[1]
    assert "megapixels" in status and "Traceback" not in status
    assert "Could not run" in client.predict(None, SAMPLE_QUERY, "llavaseg", api_name="/segment")[1]


def test_an_unexpected_failure_is_one_line_in_the_page_and_a_traceback_in_the_log(served, monkeypatch, caplog):
    _, session, client, _, _, _ = served

    def broken(*args, **kwargs):
        raise RuntimeError("deep inside a model\nwith a second line")

    monkeypatch.setattr(session, "segment", broken)
    status = client.predict(gradio_client.handle_file(str(sample_scene())), SAMPLE_QUERY, "llavaseg",
                            api_name="/segment")[1]
    assert "internal error (RuntimeError)" in status and "deep inside" not in status
    assert any(record.exc_info for record in caplog.records if record.name == "llavaseg.demo.app")


def test_two_routes_side_by_side_are_each_the_library_s(served, tiny_segmenter):
    _, _, client, _, _, _ = served
    overlay_a, overlay_b, status, table, both = client.predict(
        gradio_client.handle_file(str(sample_scene())), SAMPLE_QUERY, "llavaseg", "llavaseg-noattr",
        api_name="/compare")
    results = json.loads(Path(both).read_text())
    for route in ("llavaseg", "llavaseg-noattr"):
        expected = tiny_segmenter.with_route(route)(sample_scene(), SAMPLE_QUERY)
        assert np.array_equal(SegmentationResult.model_validate(results[route]).mask, expected.mask)
    assert "Mask IoU between the two routes" in table and status == ""
    assert Path(overlay_a).is_file() and Path(overlay_b).is_file()
    same = client.predict(gradio_client.handle_file(str(sample_scene())), SAMPLE_QUERY, "llavaseg", "llavaseg",
                          api_name="/compare")
    assert "two different routes" in same[2]


def test_chat_continues_one_conversation_and_segments_a_turn_on_request(served, tiny_segmenter):
    _, _, client, _, _, _ = served
    image = gradio_client.handle_file(str(sample_scene()))
    first, second = "what colour is the square ?", "the circle"
    messages = client.predict(image, first, False, "llavaseg", api_name="/chat")[0]
    messages, _, status, overlay, mask_png = client.predict(image, second, True, "llavaseg", api_name="/chat")
    pixels = np.asarray(Image.open(sample_scene()).convert("RGB"))
    expected = tiny_segmenter.mllm.converse([pixels], [[first, second]])[0]  # the same two-turn conversation
    texts = [_text_of(m) for m in messages if m["role"] == "assistant"]
    assert texts[0] == expected[0] and texts[1] == expected[1]
    assert np.array_equal(_mask_png(mask_png), tiny_segmenter(sample_scene(), second).mask)
    assert any("Mask from route" in text for text in texts) and Path(overlay).is_file() and status == ""
    assert "type a message first" in client.predict(image, "", False, "llavaseg", api_name="/chat")[2]
    assert client.predict(api_name="/clear_chat")[0] == []


def test_the_page_loads_no_web_fonts_sends_no_analytics_and_reaches_no_other_machine(served):
    app, _, _, url, _, refused = served
    theme_css = urllib.request.urlopen(url.rstrip("/") + "/theme.css", timeout=10).read().decode()
    assert "fonts.googleapis" not in theme_css and "@import" not in theme_css
    assert re.search(r"url\(\s*['\"]?(https?:)?//", theme_css) is None  # no stylesheet or font from elsewhere
    assert app.analytics_enabled is False and os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert refused == []  # after the tests above: segment, compare, chat, errors


def test_the_demo_command_checks_flags_and_segment_never_imports_gradio(capsys):
    from llavaseg.cli.main import main

    assert main(["demo", "--preset", "no-such-preset"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["demo", "--port", "0"]) == 2
    from llavaseg.cli.main import _parser

    from llavaseg.cli.demo import demo_config

    defaults = _parser().parse_args(["demo"])
    assert defaults.host == "127.0.0.1" and defaults.share is False and defaults.preset == "tiny-world"
    config = demo_config(defaults)  # the default page is labelled a toy
    assert config.label == "preset tiny-world" and "synthetic coloured shapes" in config.notices[0]
    probe = "import sys, llavaseg.cli.main as m; m._parser(); print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------------- browser
def _wait_until_up(url: str, process: subprocess.Popen, log: Path, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the demo exited early: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the demo did not answer on {url} within {seconds:.0f} s")


@pytest.fixture()
def demo_process(tmp_path):
    """``llavaseg demo`` on the default tiny-world preset, as a user starts it, on a free local port."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    env.pop("GRADIO_ANALYTICS_ENABLED", None)  # the demo must switch analytics off itself
    log = tmp_path / "demo.log"
    with log.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "llavaseg.cli.main", "demo", "--port", str(port),
                                    "--threads", "1"], env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_up(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def _browser_or_skip():
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright python package is missing (pip install playwright; no browser download "
                    "needed: Debian's chromium is driven)")
    return sync_playwright


def _segment_in_the_page(page, query: str) -> np.ndarray:
    """Upload the sample scene, segment ``query``, wait for the overlay, download the mask PNG."""
    page.locator("#image input[type=file]").set_input_files(str(sample_scene()))
    page.locator("#image img").first.wait_for(timeout=30_000)
    page.locator("#seg-query textarea").fill(query)
    page.locator("#seg-run").click()
    page.locator("#seg-overlay img").first.wait_for(timeout=60_000)
    link = page.locator("#seg-mask-file a").first
    link.wait_for(timeout=30_000)
    with page.expect_download(timeout=30_000) as download:
        link.click()
    return _mask_png(download.value.path())


@pytest.mark.slow  # ~30-40 s: starts the command, a browser, and the tiny-world models twice
def test_in_a_real_browser_the_page_segments_offline(demo_process, tmp_path):
    sync_playwright = _browser_or_skip()
    from llavaseg import Segmenter

    requests: list[str] = []
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
            accept_downloads=True, viewport={"width": 1280, "height": 1600})
        context.on("request", lambda request: requests.append(request.url))
        try:
            page = context.new_page()
            page.goto(demo_process, wait_until="load")  # never "networkidle": the page keeps a heartbeat open
            page.locator("#header").wait_for(timeout=60_000)
            assert "Toy models." in page.locator("#header").inner_text()  # the toy preset says it is one
            mask = _segment_in_the_page(page, SAMPLE_QUERY)
            page.get_by_text("Timings per stage").click()
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            context.close()
    torch.set_num_threads(1)
    assert np.array_equal(mask, Segmenter.from_preset("tiny-world")(sample_scene(), SAMPLE_QUERY).mask)
    foreign = [url for url in requests
               if urlparse(url).scheme not in ("data", "blob") and urlparse(url).hostname != "127.0.0.1"]
    assert requests and foreign == []
    assert SCREENSHOT.stat().st_size > 10_000
