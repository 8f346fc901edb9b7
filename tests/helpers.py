"""Test fixtures' building blocks: a real HTTP server on 127.0.0.1 that misbehaves on request, and images
of every awkward kind, made from real photos that ship with scikit-image."""
from __future__ import annotations

import http.server
import io
import logging
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

# Bounds for the misbehaving routes, so a broken client can never keep the server busy for long.
# The demo profile's quality thresholds switched off, for tests that run it on datasets of their own, not scored
UNSCORED = ["quality.min_clip_score=null", "quality.dedup=null"]


DRIP_MAX_SECONDS = 20
BLOCK_MAX_SECONDS = 60


def photo(name: str = "astronaut") -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def large_jpeg(size=(2048, 1536), name: str = "astronaut") -> bytes:
    return encode(photo(name).resize(size, Image.Resampling.LANCZOS), quality=95)


def exif_rotated_jpeg(orientation: int = 6) -> tuple[bytes, Image.Image]:
    """A JPEG stored sideways with an EXIF tag saying how to turn it upright, and the upright picture."""
    upright = photo("coffee")  # 600x400, not square
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways writes
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, quality=95, exif=exif.tobytes()), upright


def png_bomb_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data is garbage: decoding it would fail."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


class MisbehavingServer(http.server.ThreadingHTTPServer):
    """Routes (all GET):
      /file/NAME                serve files[NAME] = (bytes, content type, extra headers)
      /status/CODE              answer with that status
      /flaky/N/NAME             503 for the first N requests of this path, then the file
      /reset/N/NAME             reset the connection for the first N requests, then the file
      /silent/N/NAME            say nothing (until the client gives up) for the first N requests, then the file
      /drip                     headers, then one body byte every 20 ms
      /drip-headers             one header byte every 20 ms
      /endless                  an image/jpeg body with no length that never ends
      /huge-length              Content-Length of a terabyte
      /loop/A, /loop/B          redirect to each other
      /chain/N                  N redirects, then a file ('chain-target')
      /redirect?to=URL          redirect to URL
      /block/NAME               announce arrival (events['arrived']), wait for events['release'], serve the file
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, tuple[bytes, str, dict]] = {}
        self.hits: Counter = Counter()
        self.lock = threading.Lock()
        self.arrived = threading.Event()
        self.release = threading.Event()
        self.stop_misbehaving = threading.Event()
        self.client_hung_up = threading.Event()  # a dripping route saw the client close the connection

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add(self, name: str, data: bytes, content_type: str = "image/jpeg", **headers) -> str:
        self.files[name] = (data, content_type, headers)
        return f"{self.base}/file/{name}"

    def count(self, path: str) -> int:
        with self.lock:
            return self.hits[path]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: MisbehavingServer

    def log_message(self, *args) -> None:
        pass

    def _send_file(self, name: str) -> None:
        data, content_type, headers = self.server.files[name]
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(data)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: C901 - one branch per route reads best here
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        with self.server.lock:
            self.server.hits[url.path] += 1
            hit = self.server.hits[url.path]
        route = parts[0]
        self.close_connection = True
        if route == "file":
            self._send_file(parts[1])
        elif route == "status":
            self.send_response(int(parts[1]))
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif route in ("flaky", "reset", "silent") and hit <= int(parts[1]):
            if route == "flaky":
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif route == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            else:
                self.server.stop_misbehaving.wait(DRIP_MAX_SECONDS)
        elif route in ("flaky", "reset", "silent"):
            self._send_file(parts[2])
        elif route == "drip":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(10**6))
            self.end_headers()
            self._dribble(b"\xff" * 10**6)
        elif route == "drip-headers":
            self._dribble(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n" + b"X-Slow: " + b"a" * 10**5)
        elif route == "endless":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            chunk = b"\xff" * 65536
            try:
                for _ in range(4096):  # at most 256 MB, then stop whatever the client does
                    self.wfile.write(chunk)
            except OSError:
                pass
        elif route == "huge-length":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
        elif route == "loop":
            self._redirect("/loop/B" if parts[1] == "A" else "/loop/A")
        elif route == "chain":
            n = int(parts[1])
            self._redirect(f"/chain/{n - 1}") if n > 0 else self._send_file("chain-target")
        elif route == "redirect":
            self._redirect(parse_qs(url.query)["to"][0])
        elif route == "block":
            self.server.arrived.set()
            self.server.release.wait(BLOCK_MAX_SECONDS)
            self._send_file(parts[1])
        else:
            self.send_error(404)

    def _dribble(self, data: bytes) -> None:
        end = time.monotonic() + DRIP_MAX_SECONDS
        try:
            for i in range(len(data)):
                if time.monotonic() > end or self.server.stop_misbehaving.is_set():
                    return
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                time.sleep(0.02)  # the misbehaviour under test: a server that drips bytes
        except OSError:
            self.server.client_hung_up.set()


def make_tls_files(folder, hostname: str = "localhost") -> tuple[str, str, str]:
    """A throwaway CA and a server certificate for `hostname` signed by it: (ca.pem, cert.pem, key.pem)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, public_key, signing_key, ca: bool, san=None):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False), critical=True).add_extension(
                x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "4m test CA")])
    ca_cert = cert(ca_name, ca_name, ca_key.public_key(), ca_key, ca=True)
    server_cert = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]), ca_name,
                       key.public_key(), ca_key, ca=False, san=hostname)
    paths = [str(folder / n) for n in ("ca.pem", "cert.pem", "key.pem")]
    for path, data in zip(paths, [ca_cert.public_bytes(serialization.Encoding.PEM),
                                  server_cert.public_bytes(serialization.Encoding.PEM),
                                  key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption())]):
        with open(path, "wb") as f:
            f.write(data)
    return tuple(paths)


DATASET_PHOTOS = ["chelsea", "coffee", "astronaut", "rocket", "camera"]


def make_labelled_input(root, corrupt_key="000000003"):
    """Two committed rgb (and caption) shards as the download stage writes them; one image is corrupt."""
    import pyarrow as pa

    from stages.dataset.shards import DatasetLayout, ShardWriter

    layout = DatasetLayout(root)
    keys = [f"{i:09d}" for i in range(5)]
    for shard, chunk in (("shard-000000", keys[:3]), ("shard-000001", keys[3:])):
        with ShardWriter(layout, "download", shard, ["rgb", "caption"]) as writer:
            for key in chunk:
                name = DATASET_PHOTOS[int(key)]
                data = b"\xff\xd8 not really a jpeg" if key == corrupt_key else encode(photo(name), quality=95)
                writer.write(key, {"rgb": ("jpg", data), "caption": ("txt", f"a photo of a {name}".encode())})
            writer.commit(pa.table({"key": chunk, "status": ["ok"] * len(chunk)}),
                          {"rows": len(chunk), "ok": len(chunk), "status_counts": {"ok": len(chunk)}})
    return layout


# -- non-constant targets for the tokenizer quality checks, made from real photos -----------------------------
QUALITY_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "camera", "immunohistochemistry",
                  "retina")


def photo_tensor(size: int):
    """The photos center-cropped and resized to size x size: float (N, 3, size, size) in [-1, 1]."""
    import torch

    crops = []
    for name in QUALITY_PHOTOS:
        im = photo(name)
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        crops.append(np.asarray(im))
    return torch.tensor(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1


def quality_targets(modality: str, rgb):
    """Maps with the photos' structure, in each tokenizer's input form: depth from the blurred luminance,
    normals from its gradients (a height field), segmentation from luminance quantised into four classes,
    CLIP-like maps as a fixed random projection of each 16x16 patch."""
    import torch
    import torch.nn.functional as F

    luminance = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2])[:, None]
    blur = max(3, rgb.shape[-1] // 16) | 1  # odd, a patch's width at most

    def smoothed(x):
        for _ in range(2):
            x = F.avg_pool2d(F.pad(x, [blur // 2] * 4, mode="replicate"), blur, stride=1)
        return x

    smooth = smoothed(luminance)
    if modality == "rgb":
        return rgb
    if modality == "depth":
        return smooth.clamp(-1, 1)
    if modality == "normal":
        dy, dx = torch.gradient(smooth[:, 0] * rgb.shape[-1] / 4, dim=(1, 2))
        return F.normalize(torch.stack([-dx, -dy, torch.ones_like(dx)], dim=1), dim=1)
    if modality == "semseg":
        return torch.bucketize(smooth[:, 0], torch.tensor([-0.5, 0.0, 0.5]))
    generator = torch.Generator().manual_seed(0)
    projection = torch.randn(3 * 16 * 16, 512, generator=generator) / 16
    patches = F.unfold(rgb, 16, stride=16).transpose(1, 2)  # (N, cells, 768)
    features = torch.tanh(patches @ projection)
    side = rgb.shape[-1] // 16
    return features.transpose(1, 2).reshape(len(rgb), 512, side, side)


def fit_tokenizer(model, data, steps: int, lr: float, batch: int = 4, seed: int = 0, loss: str = "mse",
                  flip: bool = True):
    """A short AdamW run on random batches with flips (warmup, cosine decay), as the training stage steps."""
    import math

    import torch

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                                  weight_decay=0.0)
    model.train()
    for step in range(steps):
        picks = torch.randint(len(data), (batch,), generator=generator)
        x = data[picks]
        if torch.rand((), generator=generator) < 0.5 and flip:
            x = x.flip(-1)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        out = model(x, loss=loss, generator=generator)["loss"]
        optimizer.zero_grad(set_to_none=True)
        out.backward()
        optimizer.step()
    return model.eval()


def write_rgb_shard(root, sizes: list[tuple[int, int]], captions: list[str | None] | None = None):
    """One committed download shard of real photo crops with these (height, width)s, keys 0.. in order, with
    these captions beside them if given (None: that sample has none)."""
    import cv2
    import pyarrow as pa

    from stages.dataset.shards import DatasetLayout, ShardWriter

    layout, keys = DatasetLayout(root), [f"{i:09d}" for i in range(len(sizes))]
    pixels = np.asarray(photo("astronaut"))
    with ShardWriter(layout, "download", "shard-000000", ["rgb", *(["caption"] if captions else [])]) as writer:
        for i, (key, (h, w)) in enumerate(zip(keys, sizes)):
            ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(pixels[:h, :w, ::-1]))
            members = {"rgb": ("jpg", jpeg.tobytes())}
            if captions and captions[i] is not None:
                members["caption"] = ("txt", captions[i].encode())
            writer.write(key, members)
        writer.commit(pa.table({"key": keys, "status": ["ok"] * len(keys)}),
                      {"rows": len(keys), "ok": len(keys), "status_counts": {"ok": len(keys)}})
    return layout, keys


class S3Server:
    """moto's S3 API server on 127.0.0.1 (the app its standalone server runs, in a thread of the test process),
    with IAM authentication on: only `credentials` are accepted. `hold(fragment)` makes the next PUT whose path
    contains the fragment announce itself (`arrived`) and wait for `release` before the server reads its body,
    so a test can kill the uploading process in the middle of the upload; the held upload is then answered with
    an error and stored nowhere, as a store does with an upload whose client is gone."""

    def __init__(self):
        import json

        from moto import settings
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.iam.models import iam_backends
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # every request is authenticated against moto's IAM
        iam = iam_backends[DEFAULT_ACCOUNT_ID]["global"]
        iam.create_user("us-east-1", "pipeline", "/", None)
        iam.put_user_policy("pipeline", "everything", json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key("pipeline")
        self.credentials = {"AWS_ACCESS_KEY_ID": key.access_key_id, "AWS_SECRET_ACCESS_KEY": key.secret_access_key,
                            "AWS_DEFAULT_REGION": "us-east-1"}
        self.arrived, self.release = threading.Event(), threading.Event()
        self._held: str | None = None
        self._app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", 0, self._gate, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    @property
    def env(self) -> dict[str, str]:
        """The standard chain's variables a user sets for this store."""
        return {**self.credentials, "AWS_ENDPOINT_URL": self.endpoint}

    @property
    def options(self) -> dict:
        """The same as fsspec storage options (for a root handed to a stage in the test process)."""
        return {"key": self.credentials["AWS_ACCESS_KEY_ID"], "secret": self.credentials["AWS_SECRET_ACCESS_KEY"],
                "endpoint_url": self.endpoint}

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(**self.options, skip_instance_cache=True, use_listings_cache=False)

    def make_bucket(self, name: str) -> str:
        self.fs().mkdir(name)
        return name

    def hold(self, fragment: str) -> None:
        self.arrived.clear()
        self.release.clear()
        self._held = fragment

    def _gate(self, environ, start_response):
        if self._held and environ["REQUEST_METHOD"] == "PUT" and self._held in environ.get("PATH_INFO", ""):
            self._held = None
            self.arrived.set()
            self.release.wait(300)
            start_response("503 Service Unavailable", [("Content-Length", "0")])
            return [b""]
        return self._app(environ, start_response)

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()


class Gate:
    """Processes a test holds (a labeler, a training worker) report at a socket and wait there; `release` lets every
    one waiting, and every later one, go on."""

    def __init__(self):
        import socket
        import threading

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.waiting, self.released, self.cond = [], False, threading.Condition()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            connection, _ = self.listener.accept()
            with self.cond:
                if self.released:
                    connection.sendall(b"x")
                    connection.close()
                else:
                    self.waiting.append(connection)
                self.cond.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.waiting) >= count, timeout)

    def release(self):
        with self.cond:
            self.released = True
            for connection in self.waiting:
                try:
                    connection.sendall(b"x")
                except OSError:  # its process was killed with its node
                    pass
                connection.close()
            self.waiting = []


def held_profile(folder, plugin: str) -> tuple[Gate, Path]:
    """A new Gate, and a profile in `folder` that extends the paper profile (its default replica counts) with
    `plugin` as its modality module: a test's instrumentation, imported in every Ray worker, that holds processes
    at the gate ('{port}' in it names the gate's port)."""
    gate = Gate()
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "held.py").write_text(plugin.replace("{port}", str(gate.port)))
    (Path(folder) / "held.yaml").write_text("extends: paper\nmodalities: [held.py]\n")
    return gate, Path(folder) / "held.yaml"


def worker_nodes(cluster, count: int) -> list:
    """Exactly `count` live worker nodes of one CPU each (those a test before killed are gone from the list; extra
    ones removed)."""
    while len(cluster.worker_nodes) > count:
        cluster.remove_node(next(iter(cluster.worker_nodes)))
    while len(cluster.worker_nodes) < count:
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    return list(cluster.worker_nodes)


def replace_node(cluster, node) -> None:
    """A worker node lost (kill -9, with every process it started) and a new one of one CPU joining in its place."""
    from pipeline.cluster_demo import kill_node

    kill_node(cluster, node)
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
