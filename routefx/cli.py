"""The `routefx` command: the library's main jobs from a shell.

    routefx inspect MODEL                          what recognition finds (blocks, attention, FFNs) and FLOPs
    routefx compile MODEL --policy duo:0.5 --router local --calibration FILE --backend onnx --out DIR
    routefx run DIR (--text TEXT | --ids FILE)     run an exported artifact (routefx.load: numpy + onnxruntime)
    routefx bench MODEL --policy duo:0.5 ...       dense against policies: measured speedup next to FLOP-ideal
    routefx analyze MODEL --policy duo:0.5 ... --plot out.png   per-layer route mix, token x layer routing map

MODEL is a local Hugging Face model directory or `package.module:factory`; token files are plain text (tokenised
with the model's tokenizer) or safetensors of token ids (`routefx/cli_inputs.py`). Every error is one line on
stderr with exit code 2: routefx's typed errors and bad arguments alike.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from routefx.errors import RoutefxError

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one line (not the usage block) and exits with 2."""

    def error(self, message):
        raise _UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


class _UsageError(Exception):
    pass


def _add_model_args(p, policy: bool = True, calibration: bool = True):
    p.add_argument("model", metavar="MODEL", help="a local Hugging Face model directory, or package.module:factory")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (calibration windows, inputs)")
    p.add_argument("--batch", type=int, default=4, help="sequences per calibration batch")
    if policy:
        from routefx.policies import ROUTERS
        p.add_argument("--router", choices=ROUTERS, default=None, help="Duo's router (default: the policy's)")
        p.add_argument("--small", choices=("nested", "separate"), default=None, help="Duo's small branch")
        p.add_argument("--small-fraction", type=float, default=None, help="Duo's small branch width (0..1)")
        p.add_argument("--seed", type=int, default=None, help="Duo's seed (random router)")
    if calibration:
        p.add_argument("--calibration", metavar="FILE", help="calibration tokens: plain text or .safetensors ids")
        p.add_argument("--calibration-batches", type=int, default=8, help="at most this many calibration batches")


def build_parser() -> argparse.ArgumentParser:
    from routefx import cli_bench
    parser = _Parser(prog="routefx", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("inspect", help="show the recognised structure and FLOPs of a model")
    _add_model_args(p, policy=False, calibration=False)
    p.add_argument("--json", action="store_true", help="print ModelIR as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("compile", help="compile by a policy and write an artifact (ONNX) or a plan")
    _add_model_args(p)
    p.add_argument("--policy", required=True, help="dense | prune:KEEP | duo:BUDGET | a policy JSON file")
    p.add_argument("--backend", choices=("onnx", "eager", "inductor"), default="onnx")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DIR")
    p.add_argument("--generate", action="store_true", help="also write the prefill and decode graphs (KV cache) "
                   "that `routefx run --generate` and Session.generate use")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", help="run an artifact written by `routefx compile --backend onnx`")
    p.add_argument("artifact", metavar="DIR")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="text to run (tokenised with the artifact's tokenizer)")
    src.add_argument("--ids", metavar="FILE", help="token ids: .safetensors, or integers in a text/JSON file")
    p.add_argument("--generate", type=int, default=0, metavar="N", help="greedily append N tokens (with the KV "
                   "cache graphs of `routefx compile --generate`, else whole-sequence calls)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads")
    p.set_defaults(func=cmd_run)

    cli_bench.add_commands(sub, _add_model_args)
    return parser


def calibration_of(args, loaded, policy):
    """The --calibration batches; CliError when the policy needs them and none were given."""
    from routefx.cli_inputs import CliError, read_token_file
    if not args.calibration:
        if policy is not None and policy.needs_calibration:
            raise CliError(f"policy {args.policy!r} needs calibration data: pass --calibration FILE (plain text "
                           "or .safetensors token ids)")
        return None
    return read_token_file(args.calibration, loaded.tokenizer, args.seq, args.batch, args.calibration_batches)


def policy_of(args, spec: str | None = None):
    from routefx.cli_inputs import parse_policy
    return parse_policy(spec or args.policy, args.router, args.small, args.small_fraction, args.seed)


def cmd_inspect(args) -> int:
    from routefx.cli_inputs import example_batch, load_model
    from routefx.ir import capture, recognize
    from routefx.calibrate.record import data_dependent_sizes
    from routefx.ir.flops import count_flops
    loaded = load_model(args.model)
    x = example_batch(loaded.model, loaded.vocab, args.seq)
    gm = capture(loaded.model, (), x)
    ir = recognize(gm)
    if args.json:
        print(json.dumps(ir.to_dict(), indent=1, default=str))
        return 0
    print(f"{type(loaded.model).__name__} from {loaded.source}: vocab {loaded.vocab}, "
          f"{sum(p.numel() for p in loaded.model.parameters()):,} parameters"
          f"{'' if loaded.tokenizer is None else ', tokenizer found'}")
    print(ir)
    flops = count_flops(gm, ir, data_dependent_sizes(gm, x)).at(args.seq)
    print(f"FLOPs per token at S={args.seq}: {flops['total']:,.0f}")
    return 0


def cmd_compile(args) -> int:
    import routefx
    from routefx.cli_inputs import copy_tokenizer, load_model
    loaded = load_model(args.model)
    policy = policy_of(args)
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise routefx.ArtifactError(f"{args.out} exists and is not empty; pass --overwrite to replace it")
    calibration = calibration_of(args, loaded, policy)
    if calibration is None:
        from routefx.cli_inputs import example_batch
        cm = routefx.compile(loaded.model, policy, backend=args.backend, example_inputs=(),
                             example_kwargs=example_batch(loaded.model, loaded.vocab, args.seq))
    else:
        cm = routefx.compile(loaded.model, policy, calibration=calibration, backend=args.backend)
    print(cm.report)
    if args.backend == "onnx":
        routefx.export(cm, args.out, overwrite=args.overwrite, generate=args.generate)
        tok = copy_tokenizer(loaded, os.path.join(args.out, "tokenizer"))
        print(f"artifact written to {args.out} (routefx run {args.out} "
              f"{'--text ...' if tok else '--ids FILE'}; routefx.load({args.out!r}))")
    else:
        import shutil
        if os.path.isdir(args.out):
            shutil.rmtree(args.out)
        cm.plan.save(os.path.join(args.out, "plan"))
        with open(os.path.join(args.out, "report.json"), "w") as f:
            f.write(cm.report.to_json(indent=1))
        print(f"plan and report written to {args.out}: the {args.backend} backend has no ahead-of-time artifact "
              f"(routefx.compile(model, Plan.load({os.path.join(args.out, 'plan')!r})) rebuilds it; "
              "--backend onnx writes one that `routefx run` runs)")
    return 0


def cmd_run(args) -> int:
    import numpy as np
    import routefx
    from routefx.cli_inputs import artifact_tokenizer, read_ids_file
    sess = routefx.load(args.artifact, threads=args.threads)
    tok = None
    if args.text is not None:
        tok = artifact_tokenizer(args.artifact)
        ids = np.asarray([tok.encode(args.text).ids], dtype=np.int64)
    else:
        ids = read_ids_file(args.ids)
    if ids.size == 0:
        from routefx.cli_inputs import CliError
        raise CliError("the input has no tokens")

    def forward(ids):
        feeds = {"input_ids": ids}
        if "attention_mask" in sess.input_names:
            feeds["attention_mask"] = np.ones_like(ids)
        out = sess(**feeds)
        return np.asarray(out["logits"] if "logits" in out else out[0])

    logits = forward(ids)                                     # [B, S, V]
    print(f"{args.artifact}: input {list(ids.shape)} -> logits {list(logits.shape)} ({sess.source})")
    if logits.ndim == 3 and ids.shape[1] > 1:
        z = logits[:, :-1].astype(np.float64)
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, ids[:, 1:, None], -1).mean()
        print(f"next-token loss on the input {nll:.4f} (perplexity {np.exp(nll):.2f})")
    if logits.ndim == 3 and args.generate > 0:
        if "generation" in sess.manifest:                     # prefill + decode with the KV cache
            seq = sess.generate(ids[:1], max_new_tokens=args.generate, do_sample=False)
        else:                                                 # whole-sequence calls, one per token
            seq = ids[:1]
            for _ in range(args.generate):
                nxt = forward(seq)[:, -1].argmax(-1)[:, None]
                seq = np.concatenate([seq, nxt.astype(np.int64)], axis=1)
        new = seq[0, ids.shape[1]:].tolist()
        print("greedy continuation:", repr(tok.decode(new)) if tok is not None else new)
    elif logits.ndim == 3:
        print("next token (argmax):", logits[:, -1].argmax(-1).tolist())
    return 0


def main(argv=None) -> int:
    """Console entry point (`routefx = routefx.cli:main`); returns the exit code."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return args.func(args)
    except SystemExit as e:           # --help
        return e.code if isinstance(e.code, int) else 0
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RoutefxError, OSError) as e:
        text = " ".join(str(e).split())
        print(f"routefx: error: {type(e).__name__}: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
