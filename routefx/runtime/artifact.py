"""The artifact format `routefx.export` writes and `routefx.runtime` reads (stdlib only).

A directory holding `manifest.json` and the files it lists (see `routefx/compiler/export.py`). manifest.json:
    format, version       "routefx-artifact", 1 (a reader refuses a newer version)
    kind                  "onnx" (model.onnx + model.opt.onnx, run by `Session`) or "aoti" (model.pt2, an
                          AOTInductor package: torch._inductor.aoti_load_package); absent means "onnx"
    files                 {relative path: sha256 hex} for every other file of the artifact
    inputs                {"tensors": [{"name", "dtype", "shape" (per dim "B", "S", another name or a size),
                           "vocab" (token ids in [0, vocab), or null), "absent" ("ones": a call may leave the
                           input out, meaning all ones (a Hugging Face attention mask); null or missing: required)}],
                           "constants": {name: value baked in},
                           "positional": [names a call may give by position]}
    outputs               {"leaves": [{"onnx": output name} | {"const": value}], "tree": {"leaf": i} |
                           {"type": "tuple"|"list"|"dict", "keys": [...], "class": "module:Name", "children"}}
    session               {"routed": data-dependent shapes (memory pattern off), "optimized_level"}
    guards                the input sizes model.onnx / model.pt2 holds for: torch.export's guards as Python source
                           over `L['name'].size()[dim]` and baked-in values (`routefx/runtime/size_guards.py`; a call
                           outside them raises InputError; model.pt2 checks them itself and raises RuntimeError);
                           absent in artifacts of earlier releases
    generation            (export with generate=True) {"prefill" / "decode": {"file" (prefill.onnx / decode.onnx,
                           weights shared with model.onnx.data where equal), "routed", "inputs", "outputs",
                           "guards" (as above, per graph)},
                           "past": [decode cache input names], "eos", "pad", "max_new_tokens", "max_length",
                           "do_sample", "temperature", "top_k", "top_p", "processors", "sampling_processors"
                           (what the model's generation_config applies besides those: the runtime refuses)}
    checksum              sha256 of the manifest without this field (canonical JSON: sorted keys, no spaces)
    policy, plan, flops_per_token, realised_budget, routefx_version, exported_with   (for people; not read)
`verify(path)` checks the format and every checksum before anything is loaded; any missing, modified, truncated
or unlisted-version file raises `ArtifactError` naming it.
"""
from __future__ import annotations

import hashlib
import json
import os

from routefx.errors import ArtifactError

__all__ = ["FORMAT", "VERSION", "MANIFEST", "MODEL", "MODEL_DATA", "OPT_MODEL", "OPT_MODEL_DATA", "PACKAGE",
           "GEN_PREFILL", "GEN_DECODE",
           "sha256_file",
           "manifest_checksum",
           "verify"]

FORMAT, VERSION = "routefx-artifact", 1
MANIFEST = "manifest.json"
MODEL, MODEL_DATA = "model.onnx", "model.onnx.data"
OPT_MODEL, OPT_MODEL_DATA = "model.opt.onnx", "model.opt.onnx.data"
PACKAGE = "model.pt2"
GEN_PREFILL, GEN_DECODE = "prefill.onnx", "decode.onnx"     # with generate=True (manifest "generation")
_REQUIRED = {"onnx": (MODEL, MODEL_DATA, OPT_MODEL), "aoti": (PACKAGE,)}    # OPT_MODEL_DATA only when needed


def __getattr__(name):  # OPT_LEVEL needs onnxruntime; the export side alone asks for it
    if name == "OPT_LEVEL":
        import onnxruntime as ort
        return ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    raise AttributeError(name)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest without its "checksum" field (canonical JSON: sorted keys, no spaces)."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify(path: str) -> dict:
    """Read and check the manifest and every file it lists; return the manifest."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise ArtifactError(f"{path} is not an artifact directory (routefx.export writes one)")
    if not os.path.isfile(mpath):
        raise ArtifactError(f"{mpath} is missing: every routefx artifact starts with {MANIFEST}")
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e}): the file is truncated or modified") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath} is not a routefx artifact manifest (format {FORMAT!r} expected)")
    version = manifest.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise ArtifactError(f"{mpath} has artifact format version {version!r}; this routefx reads versions up to "
                            f"{VERSION}: upgrade routefx to load it")
    if manifest.get("checksum") != manifest_checksum(manifest):
        raise ArtifactError(f"{mpath} does not match its own checksum: it was modified after export")
    kind = manifest.get("kind", "onnx")
    if kind not in _REQUIRED:
        raise ArtifactError(f"{mpath} has artifact kind {kind!r}; this routefx reads kinds {sorted(_REQUIRED)}")
    files = manifest.get("files")
    required = _REQUIRED[kind]
    if not isinstance(files, dict) or any(f not in files for f in required):
        raise ArtifactError(f"{mpath} does not list the files of an artifact ({', '.join(required)} expected)")
    for rel, digest in sorted(files.items()):
        full = os.path.join(path, *rel.split("/"))
        if os.path.isabs(rel) or ".." in rel.split("/"):
            raise ArtifactError(f"{mpath} lists {rel!r}, a path outside the artifact")
        if not os.path.isfile(full):
            raise ArtifactError(f"artifact file {rel} is missing from {path}")
        if sha256_file(full) != digest:
            raise ArtifactError(f"artifact file {rel} in {path} does not match its checksum in {MANIFEST}: it was "
                                "modified or truncated after export")
    return manifest
