"""PEFT's own merge of a LoRA adapter into a bitsandbytes-quantized base, on the CPU
(tests/export.rs: a quantized base is dequantized and merged as PEFT does).

Usage: merge_bnb_ref.py BASE ADAPTER OUT.safetensors nf4|int8

Loads BASE with transformers' BitsAndBytesConfig (nf4: load_in_4bit, NF4, double quantization,
bitsandbytes' 4-bit block size 64, fp32 compute; int8: load_in_8bit, LLM.int8 row-wise absmax),
applies ADAPTER with PeftModel.from_pretrained and calls merge_and_unload(). PEFT's
Linear4bit / Linear8bitLt.merge computes the dense merged weight
    w_data = dequantize_bnb_weight(W) + get_delta_weight()
and hands it to bnb.nn.Params4bit / Int8Params, which quantize it again for the merged
(still quantized) model. That dense w_data is what a merge written at a float dtype must hold;
it is captured at that hand-over and saved as `<module>.weight` for every LoRA module.
Prints one JSON line.
"""
import json
import sys

import bitsandbytes as bnb
import peft.tuners.lora.bnb as lora_bnb
import torch
import transformers
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig


def main():
    base, adapter, out, mode = sys.argv[1:5]
    if mode == "nf4":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
        layer_cls, param_name = lora_bnb.Linear4bit, "Params4bit"
    elif mode == "int8":
        q = BitsAndBytesConfig(load_in_8bit=True)
        layer_cls, param_name = lora_bnb.Linear8bitLt, "Int8Params"
    else:
        sys.exit(f"unknown mode {mode!r} (nf4 | int8)")
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=q, device_map="cpu",
                                                 dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter)
    names = {id(m): n for n, m in model.named_modules()}

    captured, current = {}, [None]
    original_merge = layer_cls.merge
    original_param = getattr(bnb.nn, param_name)

    def merge(self, *args, **kwargs):
        current[0] = self
        return original_merge(self, *args, **kwargs)

    class Capture(original_param):
        def __new__(cls, data=None, *args, **kwargs):
            name = names[id(current[0])].removeprefix("base_model.model.")
            captured[f"{name}.weight"] = data.detach().float().clone().contiguous()
            return original_param.__new__(original_param, data, *args, **kwargs)

    layer_cls.merge = merge
    setattr(bnb.nn, param_name, Capture)
    try:
        model.merge_and_unload()
    finally:
        layer_cls.merge = original_merge
        setattr(bnb.nn, param_name, original_param)
    save_file(captured, out)
    print(json.dumps({"modules": len(captured), "bitsandbytes": bnb.__version__,
                      "transformers": transformers.__version__}))


if __name__ == "__main__":
    main()
