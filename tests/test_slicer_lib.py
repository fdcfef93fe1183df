"""Unit tests of the Slicer extension's pure-Python library (LungNLBLib): no server, no Slicer.

Synthetic arrays here only check encodings, shapes and edge cases; the workflow against a real server is
tested in test_slicer_client.py.
"""

import ast
import gzip
import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from LungNLBLib import geometry, multipart, nifti, pending, probability
from LungNLBLib.client import MonaiLabelClient, _infer_result, Response
from LungNLBLib.errors import format_detail

MODULE_DIR = Path(__file__).resolve().parents[1] / "slicer_extension" / "LungNLB"

# -- multipart ---------------------------------------------------------------------------------------------


def test_multipart_round_trip_keeps_fields_files_and_binary_content():
    payload = bytes(range(256)) * 40 + b"\r\n--not-the-boundary\r\n" + b"\r\n"
    body, content_type = multipart.encode_multipart(
        {"params": json.dumps({"slice": 3, "text": "ünï"}), "empty": ""},
        {"label": multipart.FilePart('we"ird;name.nii.gz', payload, "application/gzip")},
    )
    parts = multipart.decode_multipart(body, content_type)
    assert [part.name for part in parts] == ["params", "empty", "label"]
    assert json.loads(parts[0].text()) == {"slice": 3, "text": "ünï"}
    assert parts[1].content == b""
    assert parts[2].content == payload
    assert parts[2].filename == "we%22ird;name.nii.gz"
    assert parts[2].content_type == "application/gzip"


def test_multipart_boundary_never_occurs_in_content():
    body, content_type = multipart.encode_multipart({"a": "x"}, {"f": multipart.FilePart("f", os.urandom(4096))})
    boundary = multipart.boundary_from_content_type(content_type).encode()
    assert body.count(b"--" + boundary) == 3  # two parts + closing delimiter
    with pytest.raises(ValueError, match="occurs inside"):
        multipart.encode_multipart({"a": "xx--abc--"}, boundary="abc")


def test_multipart_decodes_requests_toolbelt_encoding_as_the_server_sends_it():
    from requests_toolbelt import MultipartEncoder  # what monailabel's infer endpoint uses

    image = gzip.compress(os.urandom(3000))
    encoder = MultipartEncoder(
        fields={"params": (None, json.dumps({"p": [0.1, 0.9]}), "application/json"), "image": ("x.nii.gz", image, "application/gzip")}
    )
    parts = multipart.decode_multipart(encoder.to_string(), encoder.content_type)
    by_name = {part.name: part for part in parts}
    assert json.loads(by_name["params"].text()) == {"p": [0.1, 0.9]}
    assert by_name["image"].content == image and by_name["image"].filename == "x.nii.gz"


def test_multipart_decoder_ignores_preamble_and_epilogue_and_rejects_truncation():
    body = (
        b"preamble\r\n--b1\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\nvalue\r\n--b1--\r\nepilogue"
    )
    parts = multipart.decode_multipart(body, 'multipart/form-data; boundary="b1"')
    assert [(p.name, p.content) for p in parts] == [("k", b"value")]
    with pytest.raises(ValueError, match="closing boundary"):
        multipart.decode_multipart(body[:-20], "multipart/form-data; boundary=b1")
    with pytest.raises(ValueError, match="multipart"):
        multipart.decode_multipart(body, "application/json")


def test_header_parameters_handle_quotes_semicolons_and_rfc5987():
    main, params = multipart.parse_header_parameters(
        'attachment; filename="a;b \\"c\\".nii.gz"; filename*=utf-8\'\'%C3%BC.nii.gz; size=10'
    )
    assert main == "attachment"
    assert params["filename"] == "ü.nii.gz"  # the extended form wins
    assert params["size"] == "10"
    _, params = multipart.parse_header_parameters('form-data; name="a;b \\"c\\""')
    assert params["name"] == 'a;b "c"'


# -- NIfTI -------------------------------------------------------------------------------------------------


def _oblique_affine() -> np.ndarray:
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.7, 0.8, 2.5]) @ np.diag([-1, -1, 1])
    affine[:3, 3] = [120.5, -80.25, -300.0]
    return affine


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_nifti_writer_is_read_by_nibabel_with_same_voxels_and_geometry(tmp_path, dtype):
    rng = np.random.default_rng(0)
    array = (rng.random((4, 6, 5)) * 100).astype(dtype)  # (Z, Y, X)
    affine = _oblique_affine()
    path = tmp_path / "v.nii.gz"
    path.write_bytes(nifti.write_nifti_bytes(array, affine))
    image = nib.load(str(path))
    assert image.shape == (5, 6, 4)  # NIfTI (x, y, z)
    np.testing.assert_array_equal(np.asarray(image.dataobj).transpose(2, 1, 0), array)
    np.testing.assert_allclose(image.get_sform(), affine, atol=1e-4)
    np.testing.assert_allclose(image.get_qform(), affine, atol=1e-4)  # qform agrees too


def test_nifti_reader_reads_nibabel_files_2d_3d_and_scaled(tmp_path):
    affine = _oblique_affine()
    volume = np.arange(60, dtype=np.int16).reshape(5, 4, 3, order="F")  # nibabel (x, y, z)
    nib.save(nib.Nifti1Image(volume, affine), str(tmp_path / "v.nii.gz"))
    read = nifti.read_nifti_bytes((tmp_path / "v.nii.gz").read_bytes())
    np.testing.assert_array_equal(read.array, volume.transpose(2, 1, 0))
    np.testing.assert_allclose(read.affine, affine, atol=1e-4)

    slice2d = np.arange(12, dtype=np.uint8).reshape(4, 3)
    nib.save(nib.Nifti1Image(slice2d, np.diag([0.5, 0.6, 1.0, 1.0])), str(tmp_path / "s.nii"))
    read2d = nifti.read_nifti_bytes((tmp_path / "s.nii").read_bytes())
    np.testing.assert_array_equal(read2d.array, slice2d.T)  # (Y, X)

    scaled = nib.Nifti1Image(np.ones((2, 2, 2), dtype=np.int16), np.eye(4))
    scaled.header.set_slope_inter(2.0, -1.0)
    nib.save(scaled, str(tmp_path / "scaled.nii"))
    np.testing.assert_allclose(nifti.read_nifti_bytes((tmp_path / "scaled.nii").read_bytes()).array, 1.0)


def test_nifti_qform_only_files_use_the_quaternion(tmp_path):
    affine = _oblique_affine()
    image = nib.Nifti1Image(np.zeros((3, 3, 3), np.uint8), None)
    image.set_qform(affine, code=1)
    image.set_sform(None, code=0)
    nib.save(image, str(tmp_path / "q.nii"))
    read = nifti.read_nifti_bytes((tmp_path / "q.nii").read_bytes())
    np.testing.assert_allclose(read.affine, image.get_qform(), atol=1e-4)


def test_nifti_round_trip_of_bool_mask_and_bad_inputs():
    mask = np.zeros((2, 8, 8), bool)
    mask[1, 2:5, 3:6] = True
    read = nifti.read_nifti_bytes(nifti.write_nifti_bytes(mask, np.eye(4)))
    assert read.array.dtype == np.uint8
    np.testing.assert_array_equal(read.array.astype(bool), mask)
    with pytest.raises(ValueError, match="4x4"):
        nifti.write_nifti_bytes(mask, np.eye(3))
    with pytest.raises(ValueError, match="singular"):
        nifti.write_nifti_bytes(mask, np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        nifti.write_nifti_bytes(np.zeros(5), np.eye(4))
    with pytest.raises(ValueError, match="NIfTI"):
        nifti.read_nifti_bytes(b"not a nifti file" * 30)
    with pytest.raises(ValueError, match="truncated"):
        nifti.read_nifti_bytes(nifti.write_nifti_bytes(mask, np.eye(4), compress=False)[:-10])


# -- geometry ----------------------------------------------------------------------------------------------


def test_slice_affine_puts_slice_pixels_where_the_volume_voxels_were():
    affine = _oblique_affine()
    volume = nifti.Volume(np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7), affine)
    piece = geometry.extract_slice(volume, 3)
    np.testing.assert_array_equal(piece.array, volume.array[3])
    np.testing.assert_allclose(geometry.ijk_to_ras(piece.affine, [[2, 4, 0]]), geometry.ijk_to_ras(affine, [[2, 4, 3]]))
    with pytest.raises(ValueError, match="outside"):
        geometry.extract_slice(volume, 5)


def test_ras_box_and_points_map_back_to_pixels_on_an_oblique_grid():
    affine = _oblique_affine()
    shape = (5, 40, 50)
    ras = geometry.ijk_to_ras(affine, [[10, 12, 2], [20, 25, 2]])
    box = geometry.ras_box_to_pixel_box(affine, shape, ras[0], ras[1], z=2)
    # the RAS box is axis-aligned in RAS, so on a rotated grid it covers at least the two corners
    assert box[0] <= 10 and box[1] <= 12 and box[2] >= 20 and box[3] >= 25
    straight = np.diag([0.7, 0.8, 2.5, 1.0])
    ras = geometry.ijk_to_ras(straight, [[10, 12, 2], [20, 25, 2]])
    assert geometry.ras_box_to_pixel_box(straight, shape, ras[1], ras[0], z=2) == [10, 12, 20, 25]
    pixels, z = geometry.points_to_pixels(affine, shape, geometry.ijk_to_ras(affine, [[3, 4, 1], [30, 7, 1]]))
    assert (pixels, z) == ([[3, 4], [30, 7]], 1)
    with pytest.raises(ValueError, match="different slices"):
        geometry.points_to_pixels(affine, shape, geometry.ijk_to_ras(affine, [[3, 4, 1], [3, 4, 2]]))
    with pytest.raises(ValueError, match="outside"):
        geometry.points_to_pixels(affine, shape, geometry.ijk_to_ras(affine, [[60, 4, 1]]))
    with pytest.raises(ValueError, match="does not cover"):
        far = geometry.ijk_to_ras(straight, [[100, 100, 2], [120, 130, 2]])
        geometry.ras_box_to_pixel_box(straight, shape, far[0], far[1], z=2)


# -- pending store -----------------------------------------------------------------------------------------


def test_pending_store_keeps_a_label_until_the_upload_succeeds(tmp_path):
    store = pending.PendingStore(str(tmp_path / "pending"))
    entry = store.save("LIDC/0001 slice", b"label-bytes", {"annotator": "ann"})
    assert [e.image_id for e in pending.PendingStore(str(tmp_path / "pending")).list()] == ["LIDC/0001 slice"]

    def failing_upload(entry, data):
        raise ConnectionError("server down")

    with pytest.raises(ConnectionError):
        store.submit(entry, failing_upload)
    assert len(store.list()) == 1 and store.read_label(store.list()[0]) == b"label-bytes"

    uploaded = []
    store.submit(store.list()[0], lambda e, data: uploaded.append((e.image_id, e.params, data)) or {"ok": 1})
    assert uploaded == [("LIDC/0001 slice", {"annotator": "ann"}, b"label-bytes")]
    assert store.list() == [] and os.listdir(tmp_path / "pending") == []
    with pytest.raises(ValueError, match="empty"):
        store.save("x", b"")


# -- probability table and errors -------------------------------------------------------------------------


def test_probability_table_rows_counts_and_bad_values():
    mask = np.zeros((3, 4, 4), np.uint8)
    mask[1, :2, :3] = 1
    rows = probability.probability_table({"2": 0.1, "0": 0.2, "1": 0.95}, mask)
    assert [(r.z, r.probability, r.mask_pixels) for r in rows] == [(0, 0.2, 0), (1, 0.95, 6), (2, 0.1, 0)]
    assert probability.probability_at(rows, 1) == 0.95 and probability.probability_at(rows, 7) is None
    merged = probability.merge_rows(rows, probability.probability_table({1: 0.3}))
    assert [r.probability for r in merged] == [0.2, 0.3, 0.1]
    assert "tumour" in probability.format_table(rows).splitlines()[2]
    with pytest.raises(ValueError, match="not in"):
        probability.probability_table([1.5])
    with pytest.raises(ValueError, match="only 3 slices"):
        probability.probability_table({5: 0.5}, mask)


def test_error_detail_formats_fastapi_bodies():
    assert format_detail({"detail": "Image NOT Found"}) == "Image NOT Found"
    validation = {"detail": [{"loc": ["query", "image"], "msg": "field required", "type": "missing"}]}
    assert format_detail(validation) == "query.image: field required"
    assert format_detail({}, fallback="Not Found") == "Not Found"


def test_infer_result_decodes_multipart_and_json_answers():
    body, content_type = multipart.encode_multipart(
        {"params": json.dumps({"slice_probability": [0.5]})}, {"image": multipart.FilePart("m.nii.gz", b"xyz")}
    )
    result = _infer_result(Response(200, content_type, "", body))
    assert result.params == {"slice_probability": [0.5]} and result.image == b"xyz" and result.filename == "m.nii.gz"
    result = _infer_result(Response(200, "application/json", "", b'{"a": 1}'))
    assert result.params == {"a": 1} and result.image is None


def test_client_rejects_bad_urls_and_names():
    with pytest.raises(ValueError, match="http://host:port"):
        MonaiLabelClient("localhost:8000")
    with pytest.raises(ValueError, match="invalid model"):
        MonaiLabelClient("http://127.0.0.1:1").infer("../x", image_id="a")


# -- Python 3.9 and standard-library-only constraints (Slicer's Python) -----------------------------------


def test_library_is_python39_syntax_and_imports_only_stdlib_and_numpy():
    allowed = set(sys.stdlib_module_names) | {"numpy"}
    for path in sorted((MODULE_DIR / "LungNLBLib").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in allowed and top != "cgi", f"{path.name} imports {name}"
            # `X | Y` in annotations would be evaluated at definition time on 3.9
        for node in ast.walk(tree):
            annotation = getattr(node, "annotation", None) or getattr(node, "returns", None)
            if annotation is not None:
                assert not any(isinstance(n, ast.BinOp) for n in ast.walk(annotation)), f"{path.name}: X | Y annotation"


# -- the Slicer module's files agree with each other (Slicer itself is not available here) ----------------


def test_module_file_is_python39_and_uses_only_widgets_the_ui_file_defines():
    import re
    import xml.etree.ElementTree as ElementTree

    source = (MODULE_DIR / "LungNLB.py").read_text(encoding="utf-8")
    ast.parse(source, feature_version=(3, 9))
    ui = ElementTree.parse(MODULE_DIR / "Resources" / "UI" / "LungNLB.ui")
    defined = {element.get("name") for element in ui.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used and used <= defined, f"widgets missing from LungNLB.ui: {sorted(used - defined)}"


def test_cmake_lists_every_library_file_and_resource():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    for path in sorted((MODULE_DIR / "LungNLBLib").glob("*.py")):
        assert f"${{MODULE_NAME}}Lib/{path.name}" in cmake, f"{path.name} is not installed by CMakeLists.txt"
    for resource in ("Resources/Icons/${MODULE_NAME}.png", "Resources/UI/${MODULE_NAME}.ui"):
        assert resource in cmake
        assert (MODULE_DIR / resource.replace("${MODULE_NAME}", "LungNLB")).is_file()
    assert "slicerMacroBuildScriptedModule" in cmake
    top = (MODULE_DIR.parents[1] / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "add_subdirectory(slicer_extension/LungNLB)" in top and "find_package(Slicer REQUIRED)" in top
    assert not (MODULE_DIR.parent / "CMakeLists.txt").exists()  # one top level: the repository's root


# -- login, TLS and what an error says (issue 16, item 4) ---------------------------------------------------

from LungNLBLib.client import Credentials  # noqa: E402
from LungNLBLib.errors import AuthenticationError, ServerUnavailableError, TLSError  # noqa: E402
from LungNLBLib.testing import FakeImage, FakeServer  # noqa: E402


def _one_image():
    return {"a": FakeImage(np.zeros((2, 4, 4), np.int16), np.eye(4))}


def test_basic_auth_is_sent_and_a_refused_login_says_so():
    with FakeServer(_one_image(), credentials=("ann", "s3cret")) as server:
        with pytest.raises(AuthenticationError, match="needs a user name and password"):
            MonaiLabelClient(server.url).info()
        with pytest.raises(AuthenticationError, match="refused the login .*check the user name"):
            MonaiLabelClient(server.url, credentials=Credentials("ann", "wrong")).info()
        assert MonaiLabelClient(server.url, credentials=Credentials("ann", "s3cret")).info()["name"] == "LungNLB (fake)"


def test_credentials_never_travel_unencrypted_to_another_machine():
    assert Credentials(token="t").header() == "Bearer t"
    with pytest.raises(ValueError, match="unencrypted"):
        MonaiLabelClient("http://annotation.example.org:8000", credentials=Credentials("ann", "pw"))
    MonaiLabelClient("https://annotation.example.org", credentials=Credentials("ann", "pw"))
    MonaiLabelClient("http://127.0.0.1:8000", credentials=Credentials(token="t"))


def test_refused_connection_and_unknown_host_are_told_apart():
    with FakeServer(_one_image()) as server:
        url = server.url
    with pytest.raises(ServerUnavailableError, match="connection refused"):
        MonaiLabelClient(url, timeout=5).info()
    with pytest.raises(ServerUnavailableError, match="unknown host"):
        MonaiLabelClient("http://no-such-host.invalid:8000", timeout=5).info()


def _tls_server(tmp_path, server):
    """Wrap the fake server's socket in TLS with a self-signed certificate for 127.0.0.1 (an 'internal CA')."""
    import ssl
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server._server.socket = context.wrap_socket(server._server.socket, server_side=True)
    return cert


def test_https_with_an_internal_ca_needs_its_bundle_and_says_so(tmp_path):
    server = FakeServer(_one_image())
    cert = _tls_server(tmp_path, server)
    with server:
        url = server.url.replace("http://", "https://")
        with pytest.raises(TLSError, match="cannot verify the TLS certificate.*CA bundle"):
            MonaiLabelClient(url, timeout=10).info()
        assert MonaiLabelClient(url, timeout=10, ca_bundle=str(cert)).info()["name"] == "LungNLB (fake)"
        other = tmp_path / "other"
        other.mkdir()
        wrong = _tls_server(other, FakeServer(_one_image()))
        with pytest.raises(TLSError, match=f"the CA bundle {wrong} did not sign it"):
            MonaiLabelClient(url, timeout=10, ca_bundle=str(wrong)).info()
    with pytest.raises(ValueError, match="is not a file"):
        MonaiLabelClient(url, ca_bundle=str(tmp_path / "missing.pem"))


def test_pending_labels_remember_their_server_and_can_be_discarded(tmp_path):
    from LungNLBLib.session import same_server

    store = pending.PendingStore(str(tmp_path))
    entry = store.save("img", b"label", {"user": "a"}, server_url="https://a.example/")
    assert store.list()[0].server_url == "https://a.example/"
    assert same_server("https://A.example", "https://a.example/") and not same_server("", "https://a.example")
    store.discard(entry)
    assert store.list() == [] and os.listdir(tmp_path) == []


# -- the watershed box (issue 16, item 7) -------------------------------------------------------------------


def test_roi_box_maps_an_image_aligned_box_and_refuses_a_rotated_one():
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    center = affine @ np.array([10.0, 20.0, 3.0, 1.0])
    along = np.eye(4)
    along[:3, 3] = center[:3]
    assert geometry.roi_to_pixel_box(affine, (6, 40, 40), along, [4.0, 2.0, 1.0], 3) == [6, 18, 14, 22]
    quarter = along.copy()
    quarter[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]  # a quarter turn keeps the box on rows and columns
    assert geometry.roi_to_pixel_box(affine, (6, 40, 40), quarter, [4.0, 2.0, 1.0], 3) == [8, 16, 12, 24]
    turned = along.copy()
    angle = np.radians(20)
    turned[:3, :3] = [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    with pytest.raises(ValueError, match="rotated"):
        geometry.roi_to_pixel_box(affine, (6, 40, 40), turned, [4.0, 2.0, 1.0], 3)
    with pytest.raises(ValueError, match="not the slice 5 shown"):
        geometry.roi_to_pixel_box(affine, (6, 40, 40), along, [4.0, 2.0, 1.0], 5)
    with pytest.raises(ValueError, match="no extent"):
        geometry.roi_to_pixel_box(affine, (6, 40, 40), along, [0.0, 2.0, 1.0], 3)


# -- packaging (issue 16, item 10) --------------------------------------------------------------------------


S4EXT_KEYS = ("scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors", "category",
              "iconurl", "status", "description", "screenshoturls", "enabled")  # Slicer's s4ext template, in its order
CATALOG_KEYS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies", "build_subdirectory",
                "enabled", "tier"}  # slicer-extension-catalog-entry-schema-v1.0.1.json (additionalProperties: false)


def _cmake_set(text, name):
    import re

    match = re.search(r'^set\({} "([^"]*)"\)'.format(name), text, re.M)
    assert match, name + " is not set"
    return match.group(1)


def test_extension_description_files_fit_slicers_extension_index():
    root = MODULE_DIR.parent
    repository = root.parent
    lines = [line for line in (root / "LungNLB.s4ext").read_text().splitlines() if line and not line.startswith("#")]
    s4ext = dict((line.split(" ", 1) + [""])[:2] for line in lines)
    assert tuple(s4ext) == S4EXT_KEYS
    assert s4ext["build_subdirectory"] == "."  # the inner build folder of a superbuild, not a source folder
    top = (repository / "CMakeLists.txt").read_text()
    assert "EXTENSION_BUILD_SUBDIRECTORY" not in top  # only superbuild extensions set it
    for key, variable in (("homepage", "HOMEPAGE"), ("contributors", "CONTRIBUTORS"), ("category", "CATEGORY"),
                          ("iconurl", "ICONURL"), ("description", "DESCRIPTION"), ("screenshoturls", "SCREENSHOTURLS"),
                          ("depends", "DEPENDS")):
        assert s4ext[key] == _cmake_set(top, "EXTENSION_" + variable), key
    assert s4ext["enabled"] == "1" and s4ext["scm"] == "git"
    description = json.loads((root / "LungNLB.json").read_text())
    assert description["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert set(description) <= CATALOG_KEYS and {"category", "scm_url"} <= set(description)
    assert description["build_subdirectory"] == "." and 1 <= description["tier"] <= 5
    assert description["scm_url"] == s4ext["scmurl"] and description["category"] == s4ext["category"]
    assert description["scm_revision"] == s4ext["scmrevision"]
    # the license and readme CPack packs, the icon and the screenshots the URLs name, in this repository
    assert "Apache License" in (repository / _cmake_set(top, "EXTENSION_LICENSE_FILE").split("}/")[1]).read_text()
    assert (repository / _cmake_set(top, "EXTENSION_README_FILE").split("}/")[1]).is_file()
    raw = "https://raw.githubusercontent.com/lungnlb/lungnlb/main/"
    for url in [s4ext["iconurl"]] + s4ext["screenshoturls"].split():
        assert url.startswith(raw)
        image = (repository / url[len(raw):]).read_bytes()
        assert image[:8] == b"\x89PNG\r\n\x1a\n", url
    module = (MODULE_DIR / "LungNLB.py").read_text()
    self_test = module[module.index("class LungNLBTest"):]
    assert "FakeServer" in self_test and "LUNGNLB_SERVER_URL" not in self_test  # the ctest needs no live server


def test_redirects_are_followed_only_to_the_same_server():
    """urllib alone follows a redirect anywhere, Authorization header included; the client follows one only
    within the same scheme, host and port."""
    import http.server
    import threading

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.server.server_port, self.path, self.headers.get("Authorization")))
            if self.path == "/info/":
                target = self.server.redirect_to
                self.send_response(307)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = b'{"name": "moved"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    first, other = servers
    try:
        url = "http://127.0.0.1:{}".format(first.server_port)
        client = MonaiLabelClient(url, timeout=5, credentials=Credentials("ann", "s3cret"))
        first.redirect_to = "/moved/"  # same server: followed, the login goes along
        assert client.info() == {"name": "moved"}
        assert [s[:2] for s in seen] == [(first.server_port, "/info/"), (first.server_port, "/moved/")]
        assert seen[-1][2] == Credentials("ann", "s3cret").header()
        seen.clear()
        first.redirect_to = "http://127.0.0.1:{}/moved/".format(other.server_port)  # another server: refused
        with pytest.raises(ServerUnavailableError, match="redirected to .*not followed"):
            client.info()
        assert [s[0] for s in seen] == [first.server_port]  # the other server never heard of it
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
