"""A synthetic webdataset for the streaming tests: small PNGs with captions in tar shards, and a local HTTP
server (127.0.0.1 only) that serves a folder to the test's own processes."""
from __future__ import annotations

import functools
import http.server
import io
import tarfile
import threading
from pathlib import Path

from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def sample_png(index: int, side: int = 32) -> tuple[bytes, str]:
    """Image ``index``: a colored square on gray at a position of its own (so every image differs)."""
    name = list(COLORS)[index % len(COLORS)]
    image = Image.new("RGB", (side, side), (128, 128, 128))
    x, y = (index * 7) % (side // 2), (index * 13) % (side // 2)
    image.paste(COLORS[name], (x, y, x + side // 2, y + side // 2))
    data = io.BytesIO()
    image.save(data, format="PNG", compress_level=1)
    return data.getvalue(), f"a {name} square"


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, images: int, shards: int) -> list[Path]:
    """``images`` samples ``{index:06d}.png`` + ``.txt`` dealt in order into ``shard-000.tar`` ..."""
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = -(-images // shards)
    paths = []
    for shard in range(shards):
        path = folder / f"shard-{shard:03d}.tar"
        with tarfile.open(path, "w") as archive:
            for index in range(shard * per_shard, min(images, (shard + 1) * per_shard)):
                png, caption = sample_png(index)
                _add(archive, f"{index:06d}.png", png)
                _add(archive, f"{index:06d}.txt", caption.encode())
        paths.append(path)
    return paths


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no request log on the test's stderr
        pass


class LocalServer:
    """``http.server`` on 127.0.0.1 (a free port) serving ``folder`` from a thread; ``url`` is its root."""

    def __init__(self, folder: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LocalServer":
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
