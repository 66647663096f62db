"""The compile report: what each pass rewrote and missed, the ModelIR before and after, timings. JSON round-trip."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from routefx.passes.manager import PassReport

__all__ = ["CompileReport"]


@dataclasses.dataclass
class CompileReport:
    policy: dict[str, Any]
    backend: str
    ir_before: dict[str, Any]
    ir_after: dict[str, Any]
    passes: list[PassReport]
    notes: list[str] = dataclasses.field(default_factory=list)
    plan: dict[str, Any] = dataclasses.field(default_factory=dict)
    flops_per_token: dict[str, Any] = dataclasses.field(default_factory=dict)
    capture_seconds: float = 0.0
    calibration_seconds: float = 0.0
    compile_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CompileReport":
        d = dict(d)
        d["passes"] = [PassReport(**p) for p in d["passes"]]
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "CompileReport":
        return cls.from_dict(json.loads(s))

    def pass_report(self, name: str) -> PassReport:
        for p in self.passes:
            if p.name == name:
                return p
        raise KeyError(f"no pass {name!r} in this report; passes: {[p.name for p in self.passes]}")

    def __str__(self) -> str:
        lines = [f"routefx compile: policy {self.policy['policy']}, backend {self.backend}, "
                 f"capture {self.capture_seconds:.2f}s, calibration {self.calibration_seconds:.2f}s, "
                 f"compile {self.compile_seconds:.2f}s"]
        f = self.flops_per_token
        if f:
            lines.append(f"  FLOPs per token at S={f['S']}: {f['before']:,.0f} -> {f['after']:,.0f} "
                         f"({f['ratio']:.3f}x)" + (" (data-dependent routes counted at their widest range)"
                                                  if f['dynamic_routes'] else ""))
            if f.get("realised"):
                r = f["realised"]
                lines.append(f"  FLOPs per token with the routes realised on the calibration data: "
                             f"{r['dense_calibration']:,.0f} -> {r['calibration']:,.0f} "
                             f"({r['calibration'] / r['dense_calibration']:.3f}x)")
        for p in self.passes:
            lines.append(f"  {p.name}: {p.rewrites} rewrite(s), {len(p.misses)} miss(es) ({p.seconds:.2f}s)")
            lines += [f"    miss {m['where']}: {m['reason']}" for m in p.misses]
            lines += [f"    note: {n}" for n in p.notes]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
