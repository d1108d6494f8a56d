"""``python serve.py`` as a user starts it: a real server on a loopback port, a browser."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from entry_points import run_entry, start_entry

from gpt_classifier.data.sms import parse_messages
from gpt_classifier.inference import TextClassifier

pytest.importorskip("litserve")

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(
    os.environ.get("GPT_CLASSIFIER_TEST_ARTIFACTS", REPO / "outputs" / "test-artifacts")
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body: bytes | None = None, content_type: str = "application/json"):
    """(status, parsed JSON or text) of a GET, or of a POST when ``body`` is given."""
    headers = {"Content-Type": content_type} if body is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=60) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def predict(url: str, payload) -> tuple[int, object]:
    return request(f"{url}/predict", json.dumps(payload).encode())


def start_server(ckpt: Path, folder: Path, *overrides: str) -> tuple[subprocess.Popen, str, list]:
    """``python serve.py`` on a free loopback port, once ``/health`` says ok: the process,
    its URL, and the ``/health`` statuses seen every 20 ms until then (0: refused)."""
    port = free_port()
    with (folder / "serve.log").open("w") as log:
        process = start_entry("serve.py", f"ckpt_path={ckpt}", f"port={port}",
                              f"hydra.run.dir={folder}", *overrides, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    statuses = [request_ok(f"{url}/health")]
    while statuses[-1] != 200:
        if process.poll() is not None or time.monotonic() > deadline:
            stop_group(process)
            pytest.fail(f"the server was not ready: {(folder / 'serve.log').read_text()[-3000:]}")
        time.sleep(0.02)
        statuses.append(request_ok(f"{url}/health"))
    return process, url, statuses


def stop_group(process: subprocess.Popen) -> None:
    """Whatever is left of the server's process group, killed."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    """A server with small limits, shared by the tests that only send requests."""
    process, url, _ = start_server(
        trained_run, tmp_path_factory.mktemp("serve"), "max_texts=8", "max_request_bytes=4096",
        "max_batch_size=8", "header_timeout=1",
    )  # fmt: skip
    yield url
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    finally:
        stop_group(process)


def request_ok(url: str) -> int:
    try:
        return request(url)[0]
    except (urllib.error.URLError, ConnectionError):
        return 0


@pytest.fixture(scope="module")
def messages(sms_file) -> list[str]:
    texts = [m.text for m in parse_messages(sms_file, {"ham": 0, "spam": 1})[:40]]
    return [*texts, "a long message " * 100]  # over gpt2-tiny's context: truncated


def as_answer(prediction) -> dict:
    return {"label": prediction.label, "probabilities": prediction.probabilities,
            "truncated": prediction.truncated}  # fmt: skip


def assert_same(answer: dict, want: dict) -> None:
    assert answer["label"] == want["label"] and answer["truncated"] == want["truncated"]
    assert answer["probabilities"].keys() == want["probabilities"].keys()
    for name, p in want["probabilities"].items():
        assert answer["probabilities"][name] == pytest.approx(p, abs=1e-6)


def test_health_info_and_predictions_equal_predict_py(server, trained_run, messages):
    assert request(f"{server}/health") == (200, "ok")
    status, info = request(f"{server}/info")
    assert status == 200
    model = info["model"]
    assert model["labels"] == ["ham", "spam"] and model["pooling"] == "last_token"
    assert model["max_length"] == 256 and model["n_layer"] == 2 and model["version"]
    # What predict.py computes for the same texts (it calls TextClassifier.classify).
    want = [as_answer(p) for p in TextClassifier.load(trained_run).classify(messages)]
    assert want[-1]["truncated"] and not want[0]["truncated"]
    status, answer = predict(server, {"text": messages[0]})
    assert status == 200
    assert_same(answer, want[0])
    for start in range(0, len(messages), 8):  # the server's max_texts is 8
        status, answer = predict(server, {"texts": messages[start : start + 8]})
        assert status == 200, answer
        assert len(answer["predictions"]) == len(messages[start : start + 8])
        for got, expected in zip(answer["predictions"], want[start : start + 8]):
            assert_same(got, expected)


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, trained_run,
                                                                      messages):  # fmt: skip
    want = [as_answer(p) for p in TextClassifier.load(trained_run).classify(messages)]
    payloads = [{"text": t} if i % 3 else {"texts": [t, messages[0]]}
                for i, t in enumerate(messages)]  # fmt: skip
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda p: predict(server, p), payloads))
    for i, (status, answer) in enumerate(answers):
        assert status == 200, answer
        if i % 3:
            assert_same(answer, want[i])
        else:
            assert_same(answer["predictions"][0], want[i])
            assert_same(answer["predictions"][1], want[0])


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"not json", 400, "not JSON"),
        (b'["a list"]', 422, "must be an object"),
        (b"{}", 422, "this request has neither"),
        (b'{"text": "a", "texts": ["b"]}', 422, "this request has both"),
        (b'{"text": ""}', 422, '"text" is empty'),
        (b'{"text": "   "}', 422, '"text" is empty'),
        (b'{"text": 42}', 422, '"text" must be a string, not int'),
        (b'{"texts": "one"}', 422, '"texts" must be a list'),
        (b'{"texts": []}', 422, "empty list"),
        (b'{"texts": ["ok", null]}', 422, '"texts"[1] must be a string, not NoneType'),
        (b'{"texts": ["a","b","c","d","e","f","g","h","i"]}', 413, "at most 8"),
        (json.dumps({"text": "x" * 5000}).encode(), 413, "over 4096 bytes"),
        (b'{"text": "a", "lang": "en"}', 422, "unknown field(s) ['lang']"),
    ],
)
def test_bad_requests_get_a_4xx_saying_what_is_wrong(server, body, status, says):
    got, answer = request(f"{server}/predict", body)
    assert (got, says in answer["detail"]) == (status, True), answer
    # ... and the server keeps serving.
    assert predict(server, {"text": "still there?"})[0] == 200


def test_form_encoded_json_is_read_as_json(server):
    # curl -d '{"text": ...}' declares form data; the body is JSON all the same.
    status, answer = request(f"{server}/predict", b'{"text": "hello"}',
                             "application/x-www-form-urlencoded")  # fmt: skip
    assert status == 200 and answer["label"] in ("ham", "spam")


def test_a_bad_checkpoint_path_fails_before_serving(tmp_path):
    result = run_entry("serve.py", f"ckpt_path={tmp_path / 'missing'}", f"port={free_port()}",
                       f"hydra.run.dir={tmp_path}", timeout=120)  # fmt: skip
    assert result.returncode != 0
    assert str(tmp_path / "missing") in result.stderr


def test_without_litserve_serve_says_what_to_install(monkeypatch):
    from omegaconf import OmegaConf

    from gpt_classifier.tasks.serve import serve

    monkeypatch.setitem(sys.modules, "litserve", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "gpt_classifier.inference.server_processes", raising=False)
    with pytest.raises(ImportError, match=r'serve.py needs litserve, which is not installed: '
                                          r'pip install -e "\.\[serve\]"'):  # fmt: skip
        serve(OmegaConf.create({"ckpt_path": "unused"}))


def test_a_port_in_use_is_named_before_the_model_loads(monkeypatch):
    from omegaconf import OmegaConf

    from gpt_classifier.tasks import serve as task
    from gpt_classifier.tasks.errors import ConfigError
    from gpt_classifier.tasks.serve import serve

    def load(*args, **kwargs):
        raise AssertionError("the model loaded before the port was checked")

    monkeypatch.setattr(task, "check_inference", lambda cfg: None)  # the model's path is fine
    monkeypatch.setattr(task.TextClassifier, "load", load)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        cfg = OmegaConf.create({"ckpt_path": "unused", "host": "127.0.0.1", "port": port})
        said = rf"host=127.0.0.1 port={port} cannot be served on .* e.g. port={port + 1}"
        with pytest.raises(ConfigError, match=said):
            serve(cfg)


def test_load_test_script_reports_each_level(server, trained_run, sms_file):
    result = run_entry("scripts/load_test.py", "--url", server, "--concurrency", "1,4",
                       "--requests", "8", "--max-seconds", "20", "--data", sms_file,
                       "--gflops", "50", "--ckpt", trained_run, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [r[0].strip() for r in rows[1:]] == ["1", "4"], result.stdout
    for row in rows[1:]:
        assert row[1].strip() == "8" and row[2].strip() == "0", result.stdout  # sent, errors
        assert float(row[4]) > 0 and row[-1].strip().endswith("%")
    assert "server p50 at concurrency 1 / bare =" in result.stdout
    refused = run_entry("scripts/load_test.py", "--url", "http://example.com:8000", timeout=60)
    assert refused.returncode != 0 and "only loopback" in refused.stderr


def chromium() -> tuple[str, str]:
    """Debian's chromium and chromedriver; in CI their absence is a failure."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    message = "chromium and chromedriver not found (apt-get install chromium chromium-driver)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def test_page_classifies_a_typed_message_in_a_real_browser(server):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=900,800"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(driver_path), options=options)
    text = "WINNER!! Claim your free prize now, call 09061701461"
    try:
        driver.get(f"{server}/")
        box = driver.find_element(By.ID, "text")
        box.send_keys(text)
        driver.find_element(By.ID, "classify").click()
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.ID, "label").text.strip())
        label = driver.find_element(By.ID, "label").text
        bars = driver.find_elements(By.CSS_SELECTOR, "#bars .row")
        shown = {b.get_attribute("data-label"): b.find_element(By.CLASS_NAME, "value").text
                 for b in bars}  # fmt: skip
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "serve-page.png"))
        # An example message: a click classifies it.
        driver.find_elements(By.CSS_SELECTOR, "button.example")[1].click()
        wait.until(lambda d: d.find_element(By.ID, "text").get_attribute("value") != text)
        example = driver.find_element(By.ID, "text").get_attribute("value")
        wait.until(lambda d: d.find_element(By.ID, "label").text.strip() != "" and
                   d.find_element(By.ID, "classify").is_enabled())  # fmt: skip
        example_label = driver.find_element(By.ID, "label").text
        info_line = driver.find_element(By.ID, "model").text
    finally:
        driver.quit()
    _, answer = predict(server, {"text": text})
    assert label == answer["label"]
    assert shown == {n: f"{100 * p:.1f}%" for n, p in answer["probabilities"].items()}
    assert example_label == predict(server, {"text": example})[1]["label"]
    assert "labels: ham, spam" in info_line
    assert (ARTIFACTS / "serve-page.png").read_bytes()[:4] == b"\x89PNG"


def test_the_api_answers_alone_and_batched(trained_run):
    # max_batch_size=1: LitServe hands predict one decoded request, without batch/unbatch.
    from gpt_classifier.inference.server import ClassifierAPI

    api = ClassifierAPI(str(trained_run), max_batch_size=1)
    api.setup("cpu")
    alone = api.predict(api.decode_request({"text": "see you at 5"}))
    batched = api.unbatch(api.predict(api.batch([
        api.decode_request({"texts": ["win a prize", "see you at 5"]}),
        api.decode_request({"text": "see you at 5"}),
    ])))  # fmt: skip
    assert batched[1] == alone or all(
        batched[1]["probabilities"][k] == pytest.approx(v, abs=1e-6)
        for k, v in alone["probabilities"].items()
    )
    assert [p["label"] for p in batched[0]["predictions"]] == [
        api.predict((True, [t]))["label"] for t in ("win a prize", "see you at 5")
    ]


def test_a_deeply_nested_body_is_a_400_not_a_server_error():
    from gpt_classifier.inference.server import BadRequest, parse_request

    nested = b"[" * 30_000 + b"]" * 30_000  # 60 KB, under the size limit
    with pytest.raises(BadRequest, match="nested too deeply") as refused:
        parse_request(nested, max_texts=256)
    assert refused.value.status == 400


def group_alive(pgid: int) -> list[int]:
    """The processes of group ``pgid`` still running (zombies are gone already)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(stat.parent.name))
    return alive


def wait_gone(process: subprocess.Popen, within: float) -> float:
    """Seconds until every process of the server's group has exited (fails after ``within``)."""
    start = time.monotonic()
    while group_alive(process.pid):
        process.poll()  # reap the main, whose group id outlives it otherwise
        if time.monotonic() - start > within:
            left = group_alive(process.pid)
            stop_group(process)
            pytest.fail(f"processes {left} of the server still run {within} s later")
        time.sleep(0.1)
    took = time.monotonic() - start
    process.wait(timeout=5)
    return took


def busy(url: str, requests: int) -> tuple[list, list]:
    """``requests`` long requests sent at once in threads, and the statuses they get."""
    body = json.dumps({"texts": ["please call me back about the prize " * 6] * 200}).encode()
    statuses: list = []

    def send() -> None:
        try:
            statuses.append(request(f"{url}/predict", body)[0])
        except (urllib.error.URLError, ConnectionError) as err:
            statuses.append(repr(err))

    threads = [threading.Thread(target=send) for _ in range(requests)]
    for thread in threads:
        thread.start()
    return threads, statuses


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_sigint_answers_requests_in_flight_then_stops_every_process(
    trained_run, tmp_path, signum
):
    process, url, statuses = start_server(trained_run, tmp_path)
    # The port opens while the model loads: a load balancer sees 503, never a refusal
    # once the first answer has come.
    answered = [s for s in statuses if s]
    assert answered[0] == 503 and set(answered) == {503, 200}, statuses
    threads, answers = busy(url, 12)
    time.sleep(0.3)  # the requests are in flight
    os.kill(process.pid, signum)  # the main process only, as kill, docker stop and k8s do
    took = wait_gone(process, within=10)
    for thread in threads:
        thread.join()
    assert answers == [200] * 12, answers
    assert process.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert took < 10
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def test_a_stopping_server_drops_litserves_shutdown_noise_but_not_a_crash_while_serving(
    monkeypatch,
):
    """LitServe's worker monitor, still polling while LitServe's shutdown ends the workers
    and the manager, logs a dead worker and a BrokenPipeError as a crash (seen in the test
    above): not shown once a signal has started the shutdown, shown while serving."""
    from gpt_classifier.inference import server_processes

    def record(message: str, exc_info: Any = None) -> logging.LogRecord:
        return logging.LogRecord("litserve.server", logging.ERROR, __file__, 1, message,
                                 None, exc_info)  # fmt: skip

    try:
        raise BrokenPipeError(32, "Broken pipe")
    except BrokenPipeError:
        crash = record("Monitoring worker crashed", sys.exc_info())
    died = record("⚠️ Worker LitServer-0 died; shutting down")
    monkeypatch.setattr(server_processes, "DRAINING", threading.Event())
    assert server_processes.quiet_shutdown(crash) and server_processes.quiet_shutdown(died)
    server_processes.DRAINING.set()
    assert not server_processes.quiet_shutdown(crash)
    assert not server_processes.quiet_shutdown(died)
    assert server_processes.quiet_shutdown(record("Error while terminating worker X: boom"))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_the_other_processes_exit_by_themselves_when_the_main_is_killed(trained_run, tmp_path):
    process, url, _ = start_server(trained_run, tmp_path)
    others = set(group_alive(process.pid)) - {process.pid}
    assert len(others) >= 3, others  # manager, model worker, HTTP process
    os.kill(process.pid, signal.SIGKILL)
    assert wait_gone(process, within=5) < 5
    assert request_ok(f"{url}/health") == 0  # nothing keeps the port


def test_a_connection_that_never_finishes_its_headers_is_closed(server):
    port = int(server.rsplit(":", 1)[1])
    for sent in (b"", b"GET /health HTTP/1.1\r\nHost: x\r\n"):  # nothing; half the headers
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(sent)
            start = time.monotonic()
            assert conn.recv(1024) == b""  # closed by the server (header_timeout=1)
            assert time.monotonic() - start < 5
    # A kept-alive connection: the first request is answered, a half second one times out.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b"ok"):  # /health's body
            answer += conn.recv(1024)
        assert answer.startswith(b"HTTP/1.1 200")
        conn.sendall(b"GET /health HTTP/1.1\r\n")
        start = time.monotonic()
        assert conn.recv(1024) == b""
        assert time.monotonic() - start < 5


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(),
                    reason="this machine has the GPU that the test asks for in vain")  # fmt: skip
def test_a_device_this_torch_cannot_use_is_named_before_a_worker_starts(trained_run):
    """device=cuda on a machine without CUDA: the server said it was serving while its
    worker could not start, and hung; predict.py failed in torch's words."""
    from hydra import compose, initialize_config_dir

    from gpt_classifier.inference.classifier import resolve_device
    from gpt_classifier.tasks.serve import build_server

    for device, said in (("cuda", "device=cuda: torch .* CUDA; use device=auto"),
                         ("cuda:1", "device=cuda:1: torch"), ("mps", "MPS is not available"),
                         ("gpu", "device=gpu: choose auto, cpu, cuda")):  # fmt: skip
        with pytest.raises(ValueError, match=said):
            resolve_device(device)
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("auto").type == "cpu"
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("serve", overrides=[f"ckpt_path={trained_run}", "device=cuda"])
    with pytest.raises(ValueError, match="device=cuda: torch"):
        build_server(cfg)
