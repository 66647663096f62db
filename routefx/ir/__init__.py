"""IR stage: capture, structure recognition (`ModelIR`), the routefx custom ops and FLOP accounting."""
from routefx.ir.capture import capture
from routefx.ir.model_ir import AttentionInfo, BlockInfo, FFNInfo, ModelIR
from routefx.ir.recognize import recognize

__all__ = ["capture", "recognize", "ModelIR", "BlockInfo", "FFNInfo", "AttentionInfo"]
