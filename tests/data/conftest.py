"""Small generated KVG data: single-entity images with one coloured rectangle per entity."""

from __future__ import annotations

import io
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

# Saturated, well separated colours: a composite's pixels can be told apart by colour alone.
PALETTE: dict[str, tuple[int, int, int]] = {
    "Sukhoi Su-30": (220, 20, 20),
    "Boeing 747": (20, 20, 220),
    "Airbus A320": (20, 180, 20),
    "Cessna 172": (230, 140, 0),
    "Tesla Model 3": (150, 0, 180),
    "Fiat 500": (0, 170, 170),
    "Mini Cooper": (120, 70, 20),
}
CATEGORY_OF = {
    "Sukhoi Su-30": "aircraft", "Boeing 747": "aircraft", "Airbus A320": "aircraft", "Cessna 172": "aircraft",
    "Tesla Model 3": "car", "Fiat 500": "car", "Mini Cooper": "car",
}
# Different sizes and aspect ratios, so every layout has to rescale.
SIZES = [(90, 60), (64, 96), (120, 120), (80, 50), (70, 110)]


def image_bytes(size: tuple[int, int], box: tuple[int, int, int, int] | None, color: tuple[int, int, int],
                fmt: str = "PNG") -> bytes:
    """A white image with ``box`` (pixel corners, exclusive end) filled with ``color``; the whole image if None."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (255, 255, 255))
    x1, y1, x2, y2 = box if box is not None else (0, 0, *size)
    ImageDraw.Draw(image).rectangle([x1, y1, x2 - 1, y2 - 1], fill=color)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@dataclass
class SingleEntitySet:
    """An annotations.jsonl with images beside it; ``records`` as written."""

    root: Path
    annotations: Path
    records: list[dict]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def make_single_entity_set(
    root: Path, images_per_entity: int = 2, entities: list[str] | None = None
) -> SingleEntitySet:
    """Every entity gets ``images_per_entity`` PNGs (varied sizes) with its rectangle at a known pixel box."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for e, entity in enumerate(entities or list(PALETTE)):
        for i in range(images_per_entity):
            width, height = SIZES[(e + i) % len(SIZES)]
            box = (5 + 3 * i, 4 + 2 * e, width - 6 - e, height - 5 - i)
            name = f"img_{e}_{i}.png"
            (root / name).write_bytes(image_bytes((width, height), box, PALETTE[entity]))
            records.append({"image": name, "entity": entity, "category": CATEGORY_OF[entity],
                            "boxes": list(box), "coords": "pixel_xyxy", "id": f"{e}-{i}"})
    return SingleEntitySet(root, write_jsonl(root / "annotations.jsonl", records), records)


@pytest.fixture
def single_entity_set(tmp_path: Path) -> SingleEntitySet:
    return make_single_entity_set(tmp_path / "src")


@pytest.fixture
def make_image():
    """:func:`image_bytes` for tests (conftest modules are not importable under importlib mode)."""
    return image_bytes


@pytest.fixture
def make_set():
    """:func:`make_single_entity_set` for tests."""
    return make_single_entity_set


@pytest.fixture
def palette() -> dict[str, tuple[int, int, int]]:
    return dict(PALETTE)


@pytest.fixture
def jsonl():
    """:func:`write_jsonl` for tests."""
    return write_jsonl


# ---------------------------------------------------------------------------------------------
# A local OpenAI-compatible chat-completions server (the protocol `vllm serve` speaks), in-process.


class ChatCompletionsServer:
    """``GET /v1/models`` and ``POST /v1/chat/completions`` on 127.0.0.1, answered by ``respond``.

    ``respond(text, images, body) -> list[str]``: the user turn's text, its images decoded from the
    ``data:`` URLs (PIL), and the request body; returns ``body["n"]`` contents. ``fail_next``: the
    next POSTs answered with HTTP 503 (``Retry-After: 0``). Every POST body is kept in ``requests``;
    ``max_in_flight`` is the most POSTs handled at once.
    """

    def __init__(self, respond, model: str = "tiny-teacher") -> None:
        import threading
        from http.server import ThreadingHTTPServer

        self.respond, self.model = respond, model
        self.requests: list[dict] = []
        self.fail_next = 0
        self.failed = 0
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def _handler(self):
        import base64
        from http.server import BaseHTTPRequestHandler

        from PIL import Image

        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status, payload, headers=()):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers:
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                with server.lock:
                    server.requests.append({**body, "authorization": self.headers.get("Authorization")})
                    if server.fail_next > 0:
                        server.fail_next -= 1
                        server.failed += 1
                        return self._send(503, {"error": {"message": "busy"}}, [("Retry-After", "0")])
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    contents = self._answer(body)
                finally:
                    # Counted out before the reply goes back: the client may send its next request at once.
                    with server.lock:
                        server.in_flight -= 1
                if contents is None:
                    return self._send(404, {"error": {"message": f"model {body.get('model')!r} not found"}})
                self._send(200, {"id": "chatcmpl-1", "object": "chat.completion", "model": server.model,
                                 "choices": [{"index": i, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}
                                             for i, content in enumerate(contents)]})

            def _answer(self, body):
                if body.get("model") != server.model:
                    return None
                (message,) = body["messages"]
                text = "".join(p["text"] for p in message["content"] if p["type"] == "text")
                images = []
                for part in message["content"]:
                    if part["type"] == "image_url":
                        header, _, payload = part["image_url"]["url"].partition(",")
                        assert header.startswith("data:image/") and header.endswith(";base64")
                        images.append(Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB"))
                contents = server.respond(text, images, body)
                assert len(contents) == body["n"]
                return contents

        return Handler


@pytest.fixture
def chat_server():
    """Factory: ``chat_server(respond)`` starts a :class:`ChatCompletionsServer`; all are shut down at the end."""
    servers = []

    def start(respond, **kwargs):
        servers.append(ChatCompletionsServer(respond, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="session")
def builtin_cot(tmp_path_factory):
    """The built-in CoT set (and the grounding parquet it was made from), written once per session."""
    from karl_verl.data.cot import write_builtin_cot_set

    root = tmp_path_factory.mktemp("builtin_cot")
    return write_builtin_cot_set(root, num_images=6)


# ---------------------------------------------------------------------------------------------
# verl's MultiTurnSFTDataset on CPU


@pytest.fixture
def fetch_image_calls(monkeypatch):
    """verl's process_image imports qwen_vl_utils.fetch_image, whose module imports torchvision (absent on
    CPU machines); this stand-in resizes as it does (smart_resize bounded by the dict's max_pixels) and
    records every dict verl hands it, so verl's own dataset code runs unchanged around it."""
    from PIL import Image

    from karl_verl.boxes import smart_resize

    calls = []

    def fetch_image(ele, image_patch_size=14):
        calls.append(dict(ele))
        image = ele["image"] if isinstance(ele["image"], Image.Image) else Image.open(ele["image"])
        height, width = smart_resize(image.height, image.width, factor=image_patch_size * 2, min_pixels=32 * 32,
                                     max_pixels=ele["max_pixels"])
        return image.convert("RGB").resize((width, height))

    monkeypatch.setitem(sys.modules, "qwen_vl_utils", types.SimpleNamespace(fetch_image=fetch_image))
    return calls


@pytest.fixture
def sft_dataset():
    """Factory: verl's MultiTurnSFTDataset over a parquet, with the tiny Qwen3-VL tokenizer and processor."""
    return _sft_dataset


def _sft_dataset(path):
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    from karl_verl.testing.tiny_qwen3vl import build_tiny_processor, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = {"max_length": 1024, "pad_mode": "no_padding", "truncation": "error"}
    return MultiTurnSFTDataset(str(path), tokenizer, config, processor=build_tiny_processor(tokenizer)), tokenizer
