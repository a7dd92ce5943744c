#!/usr/bin/env python3
"""Hugging Face transformers reference answers (float32, CPU) for duet's two test models.

For each model (smollm2, qwen: the GGUFs scripts/fetch-models.sh puts in models/), builds a
transformers checkpoint and a PEFT LoRA adapter from the GGUF, then records what transformers
itself answers, so duet's `quantize` and `serve` can be checked against it
(scripts/compare-with-transformers.sh does the whole round).

Steps:
  convert   : GGUF -> transformers (dequantized fp32) -> saved as bf16 safetensors + tokenizer
              + generation_config in OUT/ckpt-<model>
  lora      : random (non-zero) LoRA adapter with peft, saved with save_pretrained in OUT/lora-<model>
  reference : reload the checkpoint from disk in fp32, greedy-generate 16 tokens for 10 chat prompts
              (base, base+LoRA via PeftModel, base+LoRA merged), tokenizer checks
              -> OUT/reference-<model>.json

Run it with the Python of a virtual environment holding torch, transformers, peft, gguf,
safetensors, numpy and tokenizers. TORCH_THREADS (default 1) sets torch's CPU threads;
LORA_B_STD (default 0.02) the standard deviation of the adapter's lora_B weights.

usage: scripts/transformers_reference.py [--out DIR] [--models-dir DIR]
                                         [all|convert|lora|reference] [smollm2|qwen ...]
  defaults: --out target/transformers-reference, --models-dir models/ (both in the repository),
  all steps, both models.
"""
import argparse
import json
import os
import time

import numpy as np
import torch

# ---------------------------------------------------------------- constants
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
# Set from the command line (--out, --models-dir) in main().
OUT = os.path.join(ROOT, "target", "transformers-reference")
GGUF_DIR = os.path.join(ROOT, "models")
MODELS = {
    "smollm2": dict(gguf="SmolLM2-135M-Instruct.Q4_1.gguf", max_shard_size="100MB"),
    "qwen": dict(gguf="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", max_shard_size="5GB"),
}
SAVE_DTYPE = torch.bfloat16
LORA_R, LORA_ALPHA = 8, 16
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_B_STD = float(os.environ.get("LORA_B_STD", "0.02"))
SEED = 0
MAX_NEW_TOKENS = 16
NUM_THREADS = int(os.environ.get("TORCH_THREADS", "1"))  # keep CPU use modest

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain recursion in one sentence.",
    "Write a Python function that reverses a string.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a synonym for 'happy'.",
    "Why is the sky blue? Answer briefly.",
]
TRICKY = [
    "Hello, world!",
    "  two  spaces\n\nnewlines",
    "naïve café 日本語 🙂",
    "def f(x):\n    return x**2",
    "<|im_start|>user",
]

torch.set_num_threads(NUM_THREADS)


def ckpt_dir(m):
    return os.path.join(OUT, f"ckpt-{m}")


def lora_dir(m):
    return os.path.join(OUT, f"lora-{m}")


def timings_path(m):
    return os.path.join(OUT, f"timings-{m}.json")


def record_time(m, step, secs, extra=None):
    p = timings_path(m)
    d = json.load(open(p)) if os.path.exists(p) else {}
    d[step] = round(secs, 2)
    if extra:
        d.update(extra)
    json.dump(d, open(p, "w"), indent=1)


# ---------------------------------------------------------------- step 1: convert
def check_qk_permutation(model, gguf_path):
    """Compare HF q_proj/k_proj of layer 0 with the raw dequantized GGUF tensor."""
    import gguf

    r = gguf.GGUFReader(gguf_path)
    cfg = model.config
    res = {}
    for gname, hf in (("blk.0.attn_q.weight", model.model.layers[0].self_attn.q_proj.weight),
                      ("blk.0.attn_k.weight", model.model.layers[0].self_attn.k_proj.weight)):
        t = next(t for t in r.tensors if t.name == gname)
        raw = gguf.quants.dequantize(t.data, t.tensor_type).reshape(hf.shape).astype(np.float32)
        n_head = cfg.num_attention_heads if "attn_q" in gname else cfg.num_key_value_heads
        dim = raw.shape[0] // n_head // 2
        unperm = raw.reshape(n_head, dim, 2, raw.shape[1]).swapaxes(2, 1).reshape(raw.shape)
        h = hf.detach().float().numpy()
        res[gname] = dict(
            max_abs_diff_vs_raw_gguf=float(np.abs(h - raw).max()),
            max_abs_diff_vs_unpermuted_gguf=float(np.abs(h - unperm).max()),
        )
    return res


def convert(m):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import gguf

    t0 = time.time()
    spec = MODELS[m]
    gguf_path = os.path.join(GGUF_DIR, spec["gguf"])
    out = ckpt_dir(m)
    os.makedirs(out, exist_ok=True)

    tok = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=spec["gguf"])
    model = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=spec["gguf"], dtype=torch.float32)
    model.eval()
    t_load = time.time() - t0

    # chat template: fall back to the GGUF metadata if the load lost it
    rdr = gguf.GGUFReader(gguf_path)
    gguf_tmpl = rdr.fields["tokenizer.chat_template"].contents()
    tmpl_source = "gguf-load"
    if not tok.chat_template:
        tok.chat_template = gguf_tmpl
        tmpl_source = "copied-from-gguf-metadata"
    tmpl_equal = tok.chat_template == gguf_tmpl

    perm = check_qk_permutation(model, gguf_path)

    # save tokenizer with the template inside tokenizer_config.json (not chat_template.jinja)
    tok.save_pretrained(out, save_jinja_files=False)
    tc_path = os.path.join(out, "tokenizer_config.json")
    tc = json.load(open(tc_path))
    if "chat_template" not in tc:
        tc["chat_template"] = tok.chat_template
        json.dump(tc, open(tc_path, "w"), indent=2, ensure_ascii=False)
        tmpl_source += "+injected-into-tokenizer_config"

    # transformers 5.x attaches a GgufHfQuantizer even though the legacy loader (llama/qwen2) fully
    # dequantized the weights into plain fp32 tensors; save_pretrained refuses while it is attached.
    hq = getattr(model, "hf_quantizer", None)
    removed_quantizer = hq is not None
    if hq is not None:
        hq.remove_quantization_config(model)

    model = model.to(SAVE_DTYPE)
    ref_sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(out, max_shard_size=spec["max_shard_size"])
    if not os.path.exists(os.path.join(out, "generation_config.json")):
        model.generation_config.save_pretrained(out)
    # verify: what is on disk == the bf16 in-memory weights
    from transformers import AutoModelForCausalLM as _A
    re = _A.from_pretrained(out, dtype=SAVE_DTYPE).state_dict()
    mism = [k for k in ref_sd if k not in re or not torch.equal(ref_sd[k], re[k])]
    secs = time.time() - t0
    record_time(m, "convert_s", secs, {
        "removed_gguf_quantizer_before_save": removed_quantizer,
        "reload_mismatched_tensors": mism,
        "convert_gguf_load_s": round(t_load, 2),
        "chat_template_source": tmpl_source,
        "chat_template_equals_gguf_metadata": tmpl_equal,
        "qk_permutation_check_layer0": perm,
    })
    print(f"[{m}] convert done in {secs:.1f}s; template={tmpl_source} equal={tmpl_equal}; perm={perm}")


# ---------------------------------------------------------------- step 2: LoRA
def make_lora(m):
    from transformers import AutoModelForCausalLM
    from peft import LoraConfig, get_peft_model

    t0 = time.time()
    base = AutoModelForCausalLM.from_pretrained(ckpt_dir(m), dtype=torch.float32)
    cfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS,
                     lora_dropout=0.0, task_type="CAUSAL_LM")
    torch.manual_seed(SEED)  # lora_A init (kaiming-uniform) reproducible
    pm = get_peft_model(base, cfg)
    torch.manual_seed(SEED)
    n = 0
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(mean=0.0, std=LORA_B_STD)
                n += 1
    pm.save_pretrained(lora_dir(m))
    secs = time.time() - t0
    record_time(m, "lora_s", secs, {"lora_B_std": LORA_B_STD, "lora_B_tensors": n})
    print(f"[{m}] lora saved ({n} lora_B tensors, std={LORA_B_STD}) in {secs:.1f}s")


# ---------------------------------------------------------------- step 3: reference
def load_base(m):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt_dir(m), dtype=torch.float32)
    model.eval()
    return model


@torch.no_grad()
def run_prompts(model, tok, items):
    outs = []
    for it in items:
        ids = torch.tensor([it["prompt_ids"]], dtype=torch.long)
        g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=MAX_NEW_TOKENS, output_scores=True,
                           return_dict_in_generate=True, pad_token_id=tok.pad_token_id
                           if tok.pad_token_id is not None else tok.eos_token_id)
        gen = g.sequences[0, ids.shape[1]:].tolist()
        # first-step logits (prefill of the templated prompt): top-10 + a few stats
        logits0 = model(ids).logits[0, -1].float()
        top = torch.topk(logits0, 10)
        outs.append(dict(
            generated_ids=gen,
            generated_text=tok.decode(gen, skip_special_tokens=False),
            generated_text_skip_special=tok.decode(gen, skip_special_tokens=True),
            num_generated=len(gen),
            first_step_top10_ids=top.indices.tolist(),
            first_step_top10_logits=[round(x, 5) for x in top.values.tolist()],
            first_step_logits_mean=round(logits0.mean().item(), 6),
            first_step_logits_std=round(logits0.std().item(), 6),
            _logits0=logits0,
        ))
    return outs


def reference(m):
    import transformers, peft, gguf as gguf_mod, safetensors, tokenizers
    from importlib.metadata import version
    from transformers import AutoTokenizer
    from peft import PeftModel

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(ckpt_dir(m))
    items = []
    for p in PROMPTS:
        msgs = [{"role": "user", "content": p}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ids_via_template = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        if hasattr(ids_via_template, "keys"):
            ids_via_template = ids_via_template["input_ids"]
        items.append(dict(prompt=p, templated_prompt=text, prompt_ids=ids,
                          prompt_ids_equal_apply_chat_template_tokenize=(list(ids_via_template) == ids)))

    tricky = []
    for s in TRICKY:
        a = tok(s, add_special_tokens=False)["input_ids"]
        b = tok(s, add_special_tokens=True)["input_ids"]
        tricky.append(dict(text=s, ids_no_special=a, ids_with_special=b,
                           tokens_no_special=tok.convert_ids_to_tokens(a),
                           decode_roundtrip=tok.decode(a), roundtrip_ok=tok.decode(a) == s))

    base = load_base(m)
    attn_impl = base.config._attn_implementation
    tb = time.time()
    base_out = run_prompts(base, tok, items)
    t_base = time.time() - tb

    tl = time.time()
    lora_model = PeftModel.from_pretrained(base, lora_dir(m))
    lora_model.eval()
    lora_out = run_prompts(lora_model, tok, items)
    t_lora = time.time() - tl
    del lora_model, base

    tm = time.time()
    merged = PeftModel.from_pretrained(load_base(m), lora_dir(m)).merge_and_unload()
    merged.eval()
    merged_out = run_prompts(merged, tok, items)
    t_merged = time.time() - tm

    results = []
    n_changed = n_merged_eq = 0
    max_merge_diff = 0.0
    for it, b, l, mg in zip(items, base_out, lora_out, merged_out):
        d_bl = (b["_logits0"] - l["_logits0"]).abs().max().item()
        d_lm = (l["_logits0"] - mg["_logits0"]).abs().max().item()
        max_merge_diff = max(max_merge_diff, d_lm)
        changed = b["generated_ids"] != l["generated_ids"]
        same = l["generated_ids"] == mg["generated_ids"]
        n_changed += changed
        n_merged_eq += same
        for o in (b, l, mg):
            o.pop("_logits0")
        results.append(dict(**it, base=b, lora=l, lora_merged=mg,
                            lora_changes_output=changed, merged_equals_lora=same,
                            first_step_max_abs_logit_diff_base_vs_lora=round(d_bl, 5),
                            first_step_max_abs_logit_diff_lora_vs_merged=d_lm))

    cfg = json.load(open(os.path.join(ckpt_dir(m), "config.json")))
    timings = json.load(open(timings_path(m))) if os.path.exists(timings_path(m)) else {}
    timings.update(reference_total_s=round(time.time() - t0, 2), gen_base_s=round(t_base, 2),
                   gen_lora_s=round(t_lora, 2), gen_merged_s=round(t_merged, 2))
    ref = dict(
        model=m,
        source_gguf=os.path.join(GGUF_DIR, MODELS[m]["gguf"]),
        checkpoint_dir=ckpt_dir(m),
        lora_dir=lora_dir(m),
        settings=dict(compute_dtype="float32", checkpoint_dtype=str(SAVE_DTYPE), device="cpu",
                      do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                      stop="generation_config eos ids (generation may stop early on EOS)",
                      lora=dict(r=LORA_R, alpha=LORA_ALPHA, targets=LORA_TARGETS, b_std=LORA_B_STD, seed=SEED),
                      chat_template_messages="[{'role':'user','content':prompt}], add_generation_prompt=True",
                      prompt_ids="tokenizer(templated_prompt, add_special_tokens=False)",
                      attn_implementation=attn_impl,
                      torch_threads=NUM_THREADS),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                      gguf=version("gguf"), safetensors=safetensors.__version__, tokenizers=tokenizers.__version__,
                      numpy=np.__version__),
        generation_config=json.load(open(os.path.join(ckpt_dir(m), "generation_config.json"))),
        special_tokens=dict(bos=[tok.bos_token, tok.bos_token_id], eos=[tok.eos_token, tok.eos_token_id],
                            pad=[tok.pad_token, tok.pad_token_id], unk=[tok.unk_token, tok.unk_token_id]),
        summary=dict(prompts=len(items), lora_changed_greedy_output=n_changed,
                     merged_equals_unmerged_lora=n_merged_eq,
                     max_first_step_logit_diff_lora_vs_merged=max_merge_diff),
        timings_s=timings,
        tokenizer_checks=tricky,
        prompts=results,
    )
    path = os.path.join(OUT, f"reference-{m}.json")
    json.dump(ref, open(path, "w"), indent=1, ensure_ascii=False)
    record_time(m, "reference_s", time.time() - t0)
    print(f"[{m}] wrote {path}: lora changed {n_changed}/{len(items)}, merged==lora {n_merged_eq}/{len(items)}, "
          f"max merge logit diff {max_merge_diff:.2e}; {time.time() - t0:.1f}s")
    for r in results:
        print(f"  {r['prompt'][:40]!r:44} base={r['base']['generated_text_skip_special']!r}")
        print(f"  {'':44} lora={r['lora']['generated_text_skip_special']!r}")


STEPS = {"convert": convert, "lora": make_lora, "reference": reference}

def main():
    global OUT, GGUF_DIR
    ap = argparse.ArgumentParser(
        description="Build transformers reference answers (float32, CPU) from duet's test GGUFs.")
    ap.add_argument("step", nargs="?", default="all", choices=["all", *STEPS],
                    help="which step to run (default: all, in order)")
    ap.add_argument("models", nargs="*", metavar="model",
                    help=f"models to process, of {', '.join(MODELS)} (default: all)")
    ap.add_argument("--out", default=OUT,
                    help="output directory (default: target/transformers-reference in the repository)")
    ap.add_argument("--models-dir", default=GGUF_DIR,
                    help="directory holding the GGUF files (default: models/ in the repository)")
    args = ap.parse_args()
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model {', '.join(unknown)} (choose from {', '.join(MODELS)})")
    OUT = os.path.abspath(args.out)
    GGUF_DIR = os.path.abspath(args.models_dir)
    os.makedirs(OUT, exist_ok=True)
    models = args.models or list(MODELS)
    steps = list(STEPS) if args.step == "all" else [args.step]
    for m in models:
        for s in steps:
            STEPS[s](m)


if __name__ == "__main__":
    main()
