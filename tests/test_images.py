"""Image loading against a real local HTTP server that checks credentials like Label Studio does."""

import base64
import threading
import time

import cv2
import numpy as np
import pytest

from ale_backend import images
from ale_backend.image_cache import ImageCache
from ale_backend.images import ImageLoader, ImageLoadError, decode_image, task_image_url
from ale_backend.label_studio import LabelStudioClient, LabelStudioError
from testkit.label_studio_stand_in import FakeLabelStudio, make_jwt


def loader_for(server, api_key, **kwargs):
    return ImageLoader(LabelStudioClient(server.url, api_key), **kwargs)


@pytest.fixture()
def local_images(tmp_path, sample_images):
    """A LOCAL_FILES_ROOT with one image, and a file outside it."""
    root = tmp_path / "local-root"
    root.mkdir()
    (root / "inside.png").write_bytes(sample_images[2].read_bytes())
    (tmp_path / "outside.png").write_bytes(sample_images[2].read_bytes())
    return root


def test_upload_url_is_fetched_with_a_legacy_token(image_server, sample_images):
    image = loader_for(image_server, image_server.legacy_token).load(f"/data/upload/1/{sample_images[0].name}")
    assert image.shape == (160, 160, 3) and image.dtype == np.uint8
    assert image_server.requests[-1][1] == f"Token {image_server.legacy_token}"


def test_personal_access_token_is_exchanged_for_a_bearer_access_token(image_server, sample_images):
    loader = loader_for(image_server, image_server.refresh_token)
    image = loader.load(f"/data/local-files/?d=1/{sample_images[1].name}")
    assert image.shape == (160, 160, 3)
    assert image_server.requests[-1][1] == f"Bearer {image_server.access_token}"
    assert image_server.refresh_token not in str(image_server.requests)  # the PAT itself never goes out


def test_a_wrong_key_fails_with_the_http_status_and_a_hint(image_server, sample_images):
    with pytest.raises(ImageLoadError, match=r"HTTP 401 \(check LABEL_STUDIO_API_KEY\)"):
        loader_for(image_server, "wrong-token").load(f"/data/upload/1/{sample_images[0].name}")


def test_an_expired_personal_access_token_is_reported(image_server, sample_images):
    loader = loader_for(image_server, make_jwt("refresh", lifetime_s=-60))
    with pytest.raises(ImageLoadError, match="expired"):
        loader.load(f"/data/upload/1/{sample_images[0].name}")


def test_the_key_goes_only_to_label_studio(image_server, sample_images, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.png").write_bytes(sample_images[0].read_bytes())
    with FakeLabelStudio(tmp_path / "other", "t", "r", "a") as elsewhere:
        host = elsewhere.url.removeprefix("http://")  # a private address: it has to be allow-listed
        loader = loader_for(image_server, image_server.legacy_token, allowed_hosts=[host])
        image = loader.load(f"{elsewhere.url}/public/x.png")
    assert image.shape == (160, 160, 3)
    assert elsewhere.requests == [("/public/x.png", None)]


def test_a_redirect_from_another_host_to_label_studio_does_not_get_the_key(image_server, sample_images, tmp_path):
    (tmp_path / "other").mkdir()
    with FakeLabelStudio(tmp_path / "other", "t", "r", "a") as elsewhere:
        loader = loader_for(image_server, image_server.legacy_token,
                            allowed_hosts=[elsewhere.url.removeprefix("http://")])
        target = f"{image_server.url}/data/upload/1/{sample_images[0].name}"
        with pytest.raises(ImageLoadError, match="HTTP 401"):
            loader.load(f"{elsewhere.url}/redirect?to={target}")
    assert image_server.requests[-1] == (f"/data/upload/1/{sample_images[0].name}", None)
    # Label Studio's own URL still gets it, also when Label Studio redirects within itself
    assert loader.load(f"{image_server.url}/redirect?to={target}").shape == (160, 160, 3)
    assert image_server.requests[-1][1] == f"Token {image_server.legacy_token}"


def test_environment_proxies_are_not_used_so_the_address_check_holds(image_server, sample_images, monkeypatch):
    """Through a proxy the connection would go to the proxy, which resolves names itself: images are fetched
    directly (the proxy here records who calls it and answers nothing)."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    called = []

    def serve():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            called.append(connection.recv(200))
            connection.close()

    threading.Thread(target=serve, daemon=True).start()
    proxy = f"http://127.0.0.1:{listener.getsockname()[1]}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    try:
        loader = loader_for(image_server, image_server.legacy_token, timeout=10)
        assert loader.load(f"/data/upload/1/{sample_images[0].name}").shape == (160, 160, 3)
        with pytest.raises(ImageLoadError, match="refused: .* non-public address 10.1.2.3"):
            loader.load("http://10.1.2.3/x.png")
        assert called == []
    finally:
        listener.close()


def test_private_addresses_are_refused_before_any_request(image_server, sample_images, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.png").write_bytes(sample_images[0].read_bytes())
    loader = loader_for(image_server, image_server.legacy_token, timeout=2)
    with FakeLabelStudio(tmp_path / "other", "t", "r", "a") as elsewhere:
        for url in (f"{elsewhere.url}/public/x.png", f"{elsewhere.url.replace('127.0.0.1', 'localhost')}/public/x.png",
                    "http://169.254.169.254/latest/meta-data/", "http://10.1.2.3/x.png", "http://[::1]/x.png",
                    "http://0.0.0.0/x.png"):
            with pytest.raises(ImageLoadError, match="refused: .* non-public address"):
                loader.load(url)
        # nor through a redirect from an allowed host
        with pytest.raises(ImageLoadError, match="refused: .*169.254.169.254"):
            loader.load(f"{image_server.url}/redirect?to=http://169.254.169.254/latest/meta-data/")
        assert elsewhere.requests == []
    for url in ("file:///etc/passwd", "ftp://example.org/x.png", "gopher://x/"):
        with pytest.raises(ImageLoadError, match="refused|unsupported"):
            loader.load(url)
    loader.check_url("https://93.184.216.34/picture.png")  # public addresses pass the check
    loader.check_url(f"{image_server.url}/public/1/x.png")  # so does Label Studio's own host


def test_a_host_whose_address_changes_after_the_check_is_not_reached(image_server, sample_images, tmp_path,
                                                                      monkeypatch):
    """DNS rebinding: the first lookup answers a public address, the next ones a private one."""
    from testkit.stack import rebinding_dns

    (tmp_path / "inner").mkdir()
    (tmp_path / "inner" / "x.png").write_bytes(sample_images[0].read_bytes())
    lookups = rebinding_dns(monkeypatch)
    loader = loader_for(image_server, image_server.legacy_token, timeout=3)
    with FakeLabelStudio(tmp_path / "inner", "t", "r", "a") as inner:
        port = inner.url.rsplit(":", 1)[1]
        with pytest.raises(ImageLoadError, match="refused: rebind.example resolves to the non-public address "
                                                 "127.0.0.1"):
            loader.load(f"http://rebind.example:{port}/public/x.png")
        assert inner.requests == [] and len(lookups) >= 2  # checked at the check and again at the connection
        # the same through a redirect from Label Studio's host
        lookups.clear()
        with pytest.raises(ImageLoadError, match="refused: rebind.example"):
            loader.load(f"{image_server.url}/redirect?to=http://rebind.example:{port}/public/x.png")
        assert inner.requests == []


def test_redirects_within_allowed_hosts_are_followed(image_server, sample_images):
    loader = loader_for(image_server, image_server.legacy_token)
    target = f"{image_server.url}/public/1/{sample_images[0].name}"
    assert loader.load(f"{image_server.url}/redirect?to={target}").shape == (160, 160, 3)


def test_local_paths_must_stay_under_the_local_files_root(local_images, tmp_path):
    loader = ImageLoader(None, local_roots=[local_images])
    assert loader.load(str(local_images / "inside.png")).shape == (160, 160, 3)
    for path in (tmp_path / "outside.png", local_images / ".." / "outside.png", "/etc/passwd"):
        with pytest.raises(ImageLoadError, match="LOCAL_FILES_ROOT"):
            loader.load(str(path))


def test_label_studio_urls_need_label_studio_url():
    with pytest.raises(ImageLoadError, match="LABEL_STUDIO_URL is not set"):
        ImageLoader(None).load("/data/upload/1/a.png")


def test_a_mixed_batch_keeps_order_and_says_why_each_bad_image_failed(image_server, sample_images, local_images):
    local = local_images / "inside.png"
    tmp_path = local_images
    urls = [
        f"/data/upload/1/{sample_images[0].name}",
        "/data/upload/1/missing.png",
        "/data/upload/1/corrupt.png",
        "/data/upload/1/notes.txt",
        str(local),
        str(tmp_path / "nope.png"),
        "",
        "s3://bucket/key.png",
        f"{image_server.url}/public/1/grey.png",
        "http://127.0.0.1:9/unreachable.png",
    ]
    results = loader_for(image_server, image_server.legacy_token, timeout=2, local_roots=[local_images],
                         allowed_hosts=["127.0.0.1:9"]).load_many(urls)
    assert len(results) == len(urls)
    ok = [i for i, r in enumerate(results) if isinstance(r, np.ndarray)]
    assert ok == [0, 4, 8]
    assert results[8].shape == (50, 70, 3)  # grey images come back as 3-channel BGR
    reasons = {i: str(r) for i, r in enumerate(results) if isinstance(r, ImageLoadError)}
    assert "HTTP 404" in reasons[1]
    assert "not a decodable image" in reasons[2] and "not a decodable image" in reasons[3]
    assert "no such file" in reasons[5]
    assert "no image URL" in reasons[6]
    assert "cloud storage" in reasons[7]
    assert "ConnectionError" in reasons[9]


def test_images_are_fetched_concurrently(image_server, sample_images):
    image_server.barrier = threading.Barrier(4)
    urls = [f"{image_server.url}/together/1/{p.name}" for p in sample_images[:4]]
    results = ImageLoader(None, workers=4, allowed_hosts=["127.0.0.1"]).load_many(urls)
    assert all(isinstance(r, np.ndarray) for r in results), results


def test_a_server_that_sends_a_byte_at_a_time_is_cut_at_the_fetch_timeout(image_server):
    loader = ImageLoader(None, workers=2, timeout=1.0, allowed_hosts=["127.0.0.1"])
    started = time.monotonic()
    with pytest.raises(ImageLoadError, match=r"took longer than FETCH_TIMEOUT \(1 s\)"):
        loader.load(f"{image_server.url}/drip?every=0.1")  # each byte well within the per-read timeout
    assert time.monotonic() - started < 30  # a generous bound: without the cut the body takes 100 s


def test_slow_images_of_one_request_do_not_hold_back_another(image_server, sample_images):
    loader = ImageLoader(None, workers=2, timeout=3.0, allowed_hosts=["127.0.0.1"])
    slow = threading.Thread(target=loader.load_many, args=([f"{image_server.url}/drip?every=0.1"] * 2,))
    slow.start()
    deadline = time.monotonic() + 30
    while sum(1 for path, _ in image_server.requests if path.startswith("/drip")) < 2:  # both under way
        assert time.monotonic() < deadline
        time.sleep(0.01)
    (image,) = loader.load_many([f"{image_server.url}/public/1/{sample_images[0].name}"])
    assert image.shape == (160, 160, 3) and slow.is_alive()  # done while the slow ones still drip
    slow.join()


def test_oversized_images_are_refused(image_server, sample_images, local_images):
    loader = loader_for(image_server, image_server.legacy_token, max_bytes=1000, local_roots=[local_images])
    with pytest.raises(ImageLoadError, match="byte limit"):
        loader.load(f"/data/upload/1/{sample_images[0].name}")
    with pytest.raises(ImageLoadError, match="byte limit"):
        loader.load(str(local_images / "inside.png"))


def bomb_png(side: int) -> bytes:
    """A one-bit black PNG of side x side pixels: about 110 KB at 30000, 2.7 GB once decoded to BGR."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (side + 7) // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row * 1000) for _ in range(side // 1000)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_an_image_of_too_many_pixels_is_refused_before_it_is_decoded(image_server, tmp_path, monkeypatch):
    data = bomb_png(30000)
    assert len(data) < 200_000
    (image_server.root / "1" / "bomb.png").write_bytes(data)
    decoded = []
    monkeypatch.setattr(images.cv2, "imdecode", lambda *a: decoded.append(a) or None)  # must never be reached
    loader = loader_for(image_server, image_server.legacy_token)
    with pytest.raises(ImageLoadError, match="pixels"):
        loader.load("/data/upload/1/bomb.png")
    with pytest.raises(ImageLoadError, match="over MAX_IMAGE_PIXELS"):
        decode_image(bomb_png(2000), "small-bomb.png", max_pixels=1_000_000)
    cache = ImageCache(tmp_path / "cache", loader)  # the training rounds' path
    with pytest.raises(ImageLoadError, match="pixels"):
        cache.get(1, "/data/upload/1/bomb.png")
    assert decoded == [] and not list((tmp_path / "cache").iterdir())


def test_the_pixel_limit_is_width_times_height(sample_images):
    data = sample_images[0].read_bytes()  # 160 x 160
    assert decode_image(data, "ok.png", max_pixels=160 * 160).shape == (160, 160, 3)
    with pytest.raises(ImageLoadError, match="160 x 160 pixels is over MAX_IMAGE_PIXELS"):
        decode_image(data, "big.png", max_pixels=160 * 160 - 1)


def test_decode_rejects_empty_bytes():
    with pytest.raises(ImageLoadError, match="empty"):
        decode_image(b"")


def test_client_needs_a_url_and_a_key():
    with pytest.raises(LabelStudioError, match="LABEL_STUDIO_URL"):
        LabelStudioClient("", "key")
    with pytest.raises(LabelStudioError, match="LABEL_STUDIO_API_KEY is not set"):
        LabelStudioClient("http://127.0.0.1:1", "").auth_headers()


@pytest.mark.parametrize("uri", ["s3://camera-traps/site 4/IMG_0001.JPG", "gs://drone/a.png", "azure-blob://c/b.png"])
def test_a_cloud_storage_uri_is_read_through_its_tasks_link_in_label_studio(uri):
    link = task_image_url({"id": 42, "data": {"image": uri}}, "image")
    path, query = link.split("?", 1)
    assert path == "/tasks/42/resolve/" and query.startswith("fileuri=")
    assert base64.urlsafe_b64decode(query.removeprefix("fileuri=")).decode() == uri
    assert task_image_url({"data": {"image": uri}}, "image") == uri  # no task id: the loader says why it cannot


def test_other_task_urls_are_kept_and_a_missing_one_is_empty():
    for url in ("/data/upload/1/a.png", "https://example.org/a.png", "/tasks/3/resolve/?fileuri=czM6Ly9h"):
        assert task_image_url({"id": 3, "data": {"image": url}}, "image") == url
    assert task_image_url({"id": 3, "data": {"image": 5}}, "image") == ""
    assert task_image_url({"id": 3, "data": {}}, "image") == ""
    assert task_image_url({"id": 3}, "image") == ""


def test_images_for_inference_are_shrunk_as_decoded_within_a_pixel_budget(tmp_path, monkeypatch):
    import threading

    from ale_backend import images

    root = tmp_path / "big"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):  # 1000 x 600 each: 0.6 million pixels
        cv2.imwrite(str(root / f"{i}.png"), rng.integers(0, 255, (600, 1000, 3), dtype=np.uint8))
    in_flight, peak, lock = [0], [0], threading.Lock()
    real_decode = images.decode_image

    def counting(data, name, max_pixels):
        with lock:
            in_flight[0] += 600_000
            peak[0] = max(peak[0], in_flight[0])
        try:
            image = real_decode(data, name, max_pixels)
            threading.Event().wait(0.05)  # held a moment, as a large image would be
            return image
        finally:
            with lock:
                in_flight[0] -= 600_000

    monkeypatch.setattr(images, "decode_image", counting)
    monkeypatch.setattr(images, "DECODED_PIXELS_IN_FLIGHT", 1_500_000)  # two at a time
    loader = ImageLoader(None, workers=8, local_roots=[root])
    loaded = loader.load_for_inference([str(root / f"{i}.png") for i in range(12)], max_side=160)
    assert peak[0] <= 1_500_000 and peak[0] >= 1_200_000  # bounded, and still concurrent
    assert all((item.width, item.height) == (1000, 600) and item.pixels.shape == (96, 160, 3) for item in loaded)


def test_the_size_limit_holds_whether_the_server_declares_the_size_or_not(image_server, sample_images):
    size = sample_images[0].stat().st_size
    loader = loader_for(image_server, image_server.legacy_token, max_bytes=size - 1)
    with pytest.raises(ImageLoadError, match=f"larger than the {size - 1} byte limit"):  # counted as it streams
        loader.load(f"{image_server.url}/unsized/1/{sample_images[0].name}")
    with pytest.raises(ImageLoadError, match=f"{size} bytes is over the {size - 1} byte limit"):  # declared
        loader.load(f"{image_server.url}/declared?bytes={size}")
    roomy = loader_for(image_server, image_server.legacy_token, max_bytes=size)
    assert roomy.load(f"{image_server.url}/unsized/1/{sample_images[0].name}").shape == (160, 160, 3)


def test_a_redirect_loop_ends(image_server):
    loader = loader_for(image_server, image_server.legacy_token)
    with pytest.raises(ImageLoadError, match="more than 5 redirects"):
        loader.load(f"{image_server.url}/loop")
    assert sum(1 for path, _ in image_server.requests if path == "/loop") == 6


@pytest.mark.parametrize("addresses", [["93.184.216.34", "10.0.0.7"], ["93.184.216.34", "100.100.100.200"],
                                       ["2606:2800:220:1::1", "fd00::1"]])
def test_every_address_a_host_resolves_to_is_checked(image_server, monkeypatch, addresses):
    """A public first answer does not cover a private second one; nor does a shared or unique-local address pass
    for public (100.64.0.0/10 holds cloud metadata services)."""
    import socket

    real = socket.getaddrinfo

    def answers(host, port, *args, **kwargs):
        if host != "mixed.example":
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                 (a, port)) for a in addresses]

    monkeypatch.setattr(socket, "getaddrinfo", answers)
    with pytest.raises(ImageLoadError, match=f"non-public address {addresses[1]}"):
        loader_for(image_server, image_server.legacy_token).check_url("http://mixed.example/x.png")


def test_a_signed_urls_query_stays_out_of_errors_and_logs(image_server, caplog):
    from ale_backend.logs import RedactSecrets

    loader = loader_for(image_server, image_server.legacy_token, timeout=2)
    signed = "http://10.9.8.7/bucket/x.png?X-Amz-Signature=secret-signature&X-Amz-Credential=AKIA"
    with caplog.at_level("DEBUG"):
        (error,) = loader.load_many([signed])
        with pytest.raises(ImageLoadError) as raised:
            loader.load(f"{image_server.url}/missing.png?X-Amz-Signature=secret-signature")
    assert any("X-Amz-Signature=" in r.getMessage() for r in caplog.records)  # urllib3 logs the request line...
    redact = RedactSecrets([])
    logged = [r.getMessage() for r in caplog.records if redact.filter(r)]  # ...which the backend's handler cleans
    for text in (str(error), str(raised.value), *logged):
        assert "secret-signature" not in text and "AKIA" not in text
