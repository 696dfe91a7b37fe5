"""Monarch conversion of a causal LM of today's architecture: a small Llama pretrained here on real text.

No Llama-family checkpoint is reachable offline, so the script first pretrains one (`LlamaForCausalLM` from a config:
gated MLP, grouped-query attention whose key/value projections are rectangular, tied embeddings) with `Trainer` on the
corpus of `examples/pretrain_m2_gpt.py` (the English prose of Python's standard-library docstrings, training and
validation from disjoint source files) and with that example's tokenizer (a byte-level BPE trained on the training
text). The validation split takes no part in training or calibration. A trained folder is reused when it exists.

It then converts the model with the converter's own `convert_to_monarch` (what `m2-convert monarch` runs) for every
method, preset and ``nblocks`` asked, calibrating on training text only, loads each converted folder with
`AutoModelForCausalLM` and records:

- validation perplexity of the original, of every conversion, and of `m2-convert dense` of one conversion (which must
  equal its Monarch model's), next to a unigram model and the untrained network;
- conversion time (the whole `convert_to_monarch` call: load, calibration, projection, save);
- speed against the original: forward passes (batch x length, rounds interleaved between the models) and greedy
  decoding with `generate()` and the model's KV cache (same prompt, fixed number of new tokens); every sample kept.

    python benchmarks/bench_llama_conversion.py --model-dir /work/llama-small            # trains it if missing
    python benchmarks/bench_llama_conversion.py --model-dir /tmp/llama-tiny --quick \
        --train-file train.txt --validation-file validation.txt     # tiny sizes: under a minute on 2 idle cores

(`--quick` on the default corpus adds a minute or two: the whole standard library is read and tokenized.) On a shared
machine, `--train-minutes` caps the training time; the JSON records the steps taken.

The results go to ``--json`` (and a text table next to it, same name with ``.txt``).
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import math
import platform
import shutil
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "examples"))

from bench_common import available_cores, cpu_model, load_average, log, timing_summary  # noqa: E402
from pretrain_m2_gpt import DataArguments, ModelArguments, build_tokenizer, load_text, tokenized_blocks  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

import m2_hf  # noqa: E402, F401  (registers the converted model types with the Auto classes)
from conversion.monarch import MonarchSettings, convert_to_dense, convert_to_monarch  # noqa: E402

# The full run's recipe; `--quick` shrinks every size.
FULL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=8192, block_size=128, max_steps=300, batch_size=16, learning_rate=3e-3, warmup_steps=30,
            train_paragraphs=None, validation_blocks=256, calibration_samples=512, speed_batch=8, speed_length=128,
            speed_rounds=5, new_tokens=64, decode_rounds=3, train_minutes=None)
QUICK = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=1024, block_size=64, max_steps=40, batch_size=8, learning_rate=3e-3, warmup_steps=5,
             train_paragraphs=3000, validation_blocks=32, calibration_samples=64, speed_batch=2, speed_length=32,
             speed_rounds=2, new_tokens=8, decode_rounds=2, train_minutes=None)


# --------------------------------------------------------------------------------------------------------------------
# Data and the trained model


def corpus(recipe: dict, work: Path, tokenizer=None):
    """(training blocks, validation blocks, training paragraphs, tokenizer): the pretraining example's corpus (or the
    recipe's text files), tokenizer and blocking; the tokenizer is trained on the training paragraphs unless given."""
    files = recipe.get("train_file"), recipe.get("validation_file")
    written = work / "corpus" / "train.txt", work / "corpus" / "validation.txt"
    if files[0] is None and all(path.is_file() for path in written):  # the example wrote it on an earlier run
        files = tuple(str(path) for path in written)
    data_args = DataArguments(train_file=files[0], validation_file=files[1], block_size=recipe["block_size"],
                              max_eval_samples=recipe["validation_blocks"])
    raw = load_text(data_args, work)
    if recipe["train_paragraphs"] is not None:
        raw = {name: split.select(range(min(recipe["train_paragraphs"], len(split)))) for name, split in raw.items()}
    if tokenizer is None:
        model_args = ModelArguments(trained_vocab_size=recipe["vocab_size"])
        tokenizer = build_tokenizer(model_args, raw["train"]["text"], work)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    splits = tokenized_blocks(raw, tokenizer, data_args)
    return splits["train"], splits["validation"], raw["train"]["text"], tokenizer


def llama_config(recipe: dict, tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe["hidden_size"], intermediate_size=recipe["intermediate_size"],
        num_hidden_layers=recipe["num_hidden_layers"], num_attention_heads=recipe["num_attention_heads"],
        num_key_value_heads=recipe["num_key_value_heads"], max_position_embeddings=recipe["block_size"],
        tie_word_embeddings=True, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )


class WallClockLimit(TrainerCallback):
    """Ends training after ``minutes`` (None: never), so that a run on a shared machine ends when planned; the steps
    actually taken are recorded."""

    def __init__(self, minutes):
        self.deadline = None if minutes is None else time.monotonic() + 60 * minutes

    def on_step_end(self, args, state, control, **kwargs):
        if self.deadline is not None and time.monotonic() > self.deadline:
            control.should_training_stop = True


def pretrain(recipe: dict, model_dir: Path, work: Path) -> dict:
    """Train the Llama with `Trainer` and save it (with its tokenizer and `training.json`) to ``model_dir``."""
    train, validation, _, tokenizer = corpus(recipe, work)
    set_seed(0)
    model = LlamaForCausalLM(llama_config(recipe, tokenizer))
    untrained = validation_perplexity(model, validation)
    args = TrainingArguments(
        output_dir=str(work / "trainer"), max_steps=recipe["max_steps"],
        per_device_train_batch_size=recipe["batch_size"], learning_rate=recipe["learning_rate"],
        warmup_steps=recipe["warmup_steps"], lr_scheduler_type="cosine", weight_decay=0.01,
        logging_steps=max(1, recipe["max_steps"] // 30), eval_strategy="no", save_strategy="no", report_to="none",
        seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer,
                      callbacks=[WallClockLimit(recipe["train_minutes"])])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model.eval()
    record = {
        "recipe": recipe,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": seconds,
        "train_steps": trainer.state.global_step,
        "train_tokens": trainer.state.global_step * recipe["batch_size"] * recipe["block_size"],
        "train_blocks_available": len(train),
        "train_loss_log": [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e],
        "untrained_validation_perplexity": untrained,
        "validation_perplexity": validation_perplexity(model, validation),
        "torch_threads": torch.get_num_threads(),
        "date": date.today().isoformat(),
    }
    trainer.save_model(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    (model_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log(f"trained {record['parameters']:,} parameters in {seconds:.0f} s: validation perplexity "
        f"{record['validation_perplexity']:.2f} (untrained {untrained:.1f})")
    return record


# --------------------------------------------------------------------------------------------------------------------
# Measurements


@torch.no_grad()
def validation_perplexity(model, blocks, batch_size: int = 16) -> float:
    """exp of the mean next-token loss over every predicted token of the validation blocks."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = torch.tensor(blocks[start : start + batch_size]["input_ids"])
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(total / count)


# The first validation blocks, on which each conversion's next-token distributions are compared with the original's.
AGREEMENT_BLOCKS = 16


@torch.no_grad()
def log_probabilities(model, blocks) -> torch.Tensor:
    return model(input_ids=torch.tensor(blocks[:AGREEMENT_BLOCKS]["input_ids"])).logits.float().log_softmax(-1)


def agreement(model, blocks, reference: torch.Tensor) -> dict:
    """Mean KL(original || converted) of the next-token distributions, and how often their top token agrees."""
    converted = log_probabilities(model, blocks)
    divergence = (reference.exp() * (reference - converted)).sum(-1)
    return {"kl_to_original": float(divergence.mean()),
            "top1_agreement": float((converted.argmax(-1) == reference.argmax(-1)).float().mean())}


def unigram_perplexity(train, validation, vocab_size: int) -> float:
    """The perplexity of token frequencies of the training blocks (add-one smoothed) on the validation targets."""
    counts = collections.Counter(token for ids in train["input_ids"] for token in ids)
    total = sum(counts.values()) + vocab_size
    targets = [token for ids in validation["input_ids"] for token in ids[1:]]
    return math.exp(-sum(math.log((counts[t] + 1) / total) for t in targets) / len(targets))


@torch.no_grad()
def forward_samples(models: dict, batch: int, length: int, rounds: int, vocab: int) -> dict[str, list[float]]:
    """Seconds per forward pass of each model on the same random tokens, rounds interleaved across the models so that
    a change in the machine's load falls on all of them."""
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    for model in models.values():  # warm-up
        model(input_ids=ids)
    samples = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model(input_ids=ids)
            samples[name].append(time.perf_counter() - start)
    return samples


@torch.no_grad()
def decode_samples(models: dict, prompt, new_tokens: int, rounds: int) -> tuple[dict[str, list[float]], dict]:
    """New tokens per second of greedy `generate()` with the KV cache (exactly ``new_tokens``), interleaved rounds;
    also the generated tokens of each model."""
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)
    outputs = {}
    for name, model in models.items():  # warm-up, and the text each model writes
        outputs[name] = model.generate(**prompt, **settings)[0, prompt["input_ids"].shape[1]:].tolist()
    samples = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model.generate(**prompt, **settings)
            samples[name].append(new_tokens / (time.perf_counter() - start))
    return samples, outputs


# --------------------------------------------------------------------------------------------------------------------
# The run


def conversion_rows(args, recipe: dict, model_dir: Path, work: Path, validation, calibration_file: Path,
                    original) -> list[dict]:
    reference = log_probabilities(original, validation)
    rows = []
    for method in args.methods:
        for target in args.targets:
            for nblocks in args.nblocks:
                name = f"{method}-{target}-nb{nblocks}"
                destination = work / "converted" / name
                settings = MonarchSettings(
                    targets=[target], nblocks={"*": nblocks}, method=method,
                    calibration_file=calibration_file if method == "calibrated" else None,
                    calibration_samples=recipe["calibration_samples"],
                )
                start = time.perf_counter()
                report = convert_to_monarch(model_dir, destination, settings, overwrite=True, progress=False)
                seconds = time.perf_counter() - start
                model = AutoModelForCausalLM.from_pretrained(destination).eval()
                errors = [layer["relative_error"] for layer in report["layers"]]
                rectangular = [layer for layer in report["layers"] if layer["in_features"] != layer["out_features"]]
                rows.append({
                    "name": name, "method": method, "target": target, "nblocks": nblocks,
                    "folder": str(destination), "model_type": model.config.model_type,
                    "layers": len(report["layers"]),
                    "rectangular_layers": len(rectangular),
                    "mean_relative_weight_error": statistics.mean(errors),
                    "parameters": report["totals"]["parameters_after"],
                    "parameters_before": report["totals"]["parameters_before"],
                    "conversion_seconds": seconds,
                    "validation_perplexity": validation_perplexity(model, validation),
                    **agreement(model, validation, reference),
                })
                log(f"{name}: validation perplexity {rows[-1]['validation_perplexity']:.2f}, {seconds:.1f} s")
    return rows


def dense_round_trip(row: dict, work: Path, validation) -> dict:
    destination = work / "converted" / f"{row['name']}-dense"
    convert_to_dense(Path(row["folder"]), destination, overwrite=True)
    dense = AutoModelForCausalLM.from_pretrained(destination).eval()
    monarch = AutoModelForCausalLM.from_pretrained(row["folder"]).eval()
    ids = torch.tensor(validation[:4]["input_ids"])
    with torch.no_grad():
        difference = float((dense(input_ids=ids).logits - monarch(input_ids=ids).logits).abs().max())
    return {"of": row["name"], "model_type": dense.config.model_type, "architecture": type(dense).__name__,
            "validation_perplexity": validation_perplexity(dense, validation),
            "monarch_validation_perplexity": row["validation_perplexity"], "max_abs_logit_difference": difference}


def speed(args, recipe: dict, original, rows: list[dict], tokenizer, validation) -> dict:
    chosen = [row for row in rows if row["method"] == args.methods[0]]  # speed does not depend on the method
    models = {"original": original, **{row["name"]: AutoModelForCausalLM.from_pretrained(row["folder"]).eval()
                                       for row in chosen}}
    forward = forward_samples(models, recipe["speed_batch"], recipe["speed_length"], recipe["speed_rounds"],
                              len(tokenizer))
    prompt_ids = torch.tensor([validation[0]["input_ids"][:16]])
    prompt = {"input_ids": prompt_ids, "attention_mask": torch.ones_like(prompt_ids)}
    decode, outputs = decode_samples(models, prompt, recipe["new_tokens"], recipe["decode_rounds"])
    base_forward = statistics.median(forward["original"])
    base_decode = statistics.median(decode["original"])
    return {
        "forward": {"batch": recipe["speed_batch"], "length": recipe["speed_length"],
                    "seconds": {name: timing_summary(s) for name, s in forward.items()},
                    "speedup_vs_original": {name: base_forward / statistics.median(s) for name, s in forward.items()}},
        "decode": {"prompt_tokens": prompt_ids.shape[1], "new_tokens": recipe["new_tokens"],
                   "tokens_per_second": {name: timing_summary(s) for name, s in decode.items()},
                   "speedup_vs_original": {name: statistics.median(s) / base_decode for name, s in decode.items()},
                   "prompt": tokenizer.decode(prompt_ids[0]),
                   "continuations": {name: tokenizer.decode(ids) for name, ids in outputs.items()}},
    }


def run(args) -> dict:
    recipe = dict(QUICK if args.quick else FULL)
    for key in ("max_steps", "train_minutes", "calibration_samples", "validation_blocks", "train_file",
                "validation_file"):
        if getattr(args, key) is not None:
            recipe[key] = str(getattr(args, key)) if key.endswith("file") else getattr(args, key)
    if recipe.get("train_file") and not recipe.get("validation_file"):
        raise SystemExit("--train-file needs --validation-file: the validation text must take no part in training")
    model_dir, work = args.model_dir, args.work_dir or args.model_dir.with_name(args.model_dir.name + "-work")
    if not (model_dir / "config.json").is_file():
        pretrain(recipe, model_dir, work)
    training = json.loads((model_dir / "training.json").read_text(encoding="utf-8"))
    recipe = {**training["recipe"], **{k: v for k, v in recipe.items() if k not in training["recipe"] or
                                       k in ("calibration_samples", "validation_blocks")}}
    if args.train_only:
        return {"training": training}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, validation, paragraphs, tokenizer = corpus(recipe, work, tokenizer)
    calibration_file = work / "calibration.txt"  # training paragraphs only
    calibration_file.write_text("\n".join(paragraphs[: recipe["calibration_samples"]]) + "\n", encoding="utf-8")
    original = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    untrained = LlamaForCausalLM(original.config).eval()
    baselines = {"original": validation_perplexity(original, validation),
                 "unigram": unigram_perplexity(train, validation, len(tokenizer)),
                 "untrained": validation_perplexity(untrained, validation)}
    log(f"validation perplexity: original {baselines['original']:.2f}, unigram {baselines['unigram']:.1f}")
    rows = conversion_rows(args, recipe, model_dir, work, validation, calibration_file, original)
    # The most compressed conversion of the first method, so that the round trip materialises real Monarch factors.
    round_trip = dense_round_trip(max(rows, key=lambda row: (row["target"] == "all", row["nblocks"])), work,
                                  validation)
    measured = speed(args, recipe, original, rows, tokenizer, validation)
    if not args.keep_folders:
        shutil.rmtree(work / "converted", ignore_errors=True)
    return {
        "metadata": {"date": date.today().isoformat(), "cpu": cpu_model(), "cores": available_cores(),
                     "torch_threads": torch.get_num_threads(), "load_average_at_end": load_average(),
                     "python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__, "quick": args.quick,
                     "command": " ".join(sys.argv)},
        "training": training,
        "data": {"validation_blocks": len(validation), "block_size": recipe["block_size"],
                 "validation_tokens_predicted": len(validation) * (recipe["block_size"] - 1),
                 "calibration_lines": min(recipe["calibration_samples"], len(paragraphs)),
                 "agreement_blocks": min(AGREEMENT_BLOCKS, len(validation)),
                 "calibration_source": "training split (first paragraphs of train.txt)"},
        "baselines": baselines,
        "conversions": rows,
        "dense_round_trip": round_trip,
        "speed": measured,
    }


def format_text(result: dict) -> str:
    base = result["baselines"]
    training = result["training"]
    lines = [f"Llama conversion benchmark, {result['metadata']['date']}, {result['metadata']['cpu']}, "
             f"{result['metadata']['torch_threads']} threads",
             f"model: {training['parameters']:,} parameters, trained {training['train_tokens']:,} tokens in "
             f"{training['train_seconds']:.0f} s",
             f"validation perplexity: original {base['original']:.2f}, unigram {base['unigram']:.1f}, "
             f"untrained {base['untrained']:.1f}", "",
             f"{'conversion':<26} {'params':>10} {'weight err':>10} {'val ppl':>9} {'KL':>7} {'top1':>6} "
             f"{'convert s':>9} {'fwd x':>6} {'decode x':>8}"]
    forward = result["speed"]["forward"]["speedup_vs_original"]
    decode = result["speed"]["decode"]["speedup_vs_original"]
    lines.append(f"{'original':<26} {result['conversions'][0]['parameters_before']:>10,} {'':>10} "
                 f"{base['original']:>9.2f} {0:>7.4f} {1:>6.3f} {'':>9} {1:>6.2f} {1:>8.2f}")
    for row in result["conversions"]:
        fwd = f"{forward[row['name']]:.2f}" if row["name"] in forward else "="
        dec = f"{decode[row['name']]:.2f}" if row["name"] in decode else "="
        lines.append(f"{row['name']:<26} {row['parameters']:>10,} {row['mean_relative_weight_error']:>10.3f} "
                     f"{row['validation_perplexity']:>9.2f} {row['kl_to_original']:>7.4f} "
                     f"{row['top1_agreement']:>6.3f} "
                     f"{row['conversion_seconds']:>9.1f} {fwd:>6} {dec:>8}")
    trip = result["dense_round_trip"]
    lines += ["(= : speed as the closed-form conversion of the same preset and nblocks; the method changes no shape)",
              "", f"m2-convert dense of {trip['of']}: {trip['architecture']}, validation perplexity "
              f"{trip['validation_perplexity']:.4f} (Monarch {trip['monarch_validation_perplexity']:.4f}), max |logit "
              f"difference| {trip['max_abs_logit_difference']:.2e}"]
    speed_info = result["speed"]
    lines.append(f"KL: mean KL(original || conversion) of the next-token distributions, top1: agreement of the top "
                 f"token, on the first {result['data']['agreement_blocks']} validation blocks")
    lines.append(f"forward: batch {speed_info['forward']['batch']} x {speed_info['forward']['length']} tokens; "
                 f"decode: greedy generate() with KV cache, {speed_info['decode']['new_tokens']} new tokens after a "
                 f"{speed_info['decode']['prompt_tokens']}-token prompt; medians of interleaved rounds")
    for name, figures in speed_info["decode"]["tokens_per_second"].items():
        seconds = speed_info["forward"]["seconds"][name]
        lines.append(f"  {name:<26} forward {seconds['median'] * 1000:8.1f} ms   decode {figures['median']:7.1f} "
                     "tokens/s")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True,
                        help="the trained Llama folder; trained (and saved there) when it has no config.json")
    parser.add_argument("--work-dir", type=Path, help="corpus, tokenizer and converted folders (default: "
                        "MODEL_DIR-work next to it)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes everywhere (about a minute)")
    parser.add_argument("--train-only", action="store_true", help="train (if needed) and stop")
    parser.add_argument("--max-steps", type=int, help="training steps (default: the recipe's)")
    parser.add_argument("--train-minutes", type=float, help="end training after this many minutes even if fewer "
                        "than --max-steps were taken (the JSON records the steps taken)")
    parser.add_argument("--train-file", type=Path, help="training text, a paragraph per line (default: the "
                        "pretraining example's standard-library corpus)")
    parser.add_argument("--validation-file", type=Path, help="validation text, disjoint from the training text")
    parser.add_argument("--calibration-samples", type=int, help="training paragraphs to calibrate on")
    parser.add_argument("--validation-blocks", type=int, help="validation blocks for perplexity")
    parser.add_argument("--methods", nargs="+", default=["closed-form", "calibrated"])
    parser.add_argument("--targets", nargs="+", default=["mlp", "all"])
    parser.add_argument("--nblocks", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--keep-folders", action="store_true", help="keep the converted folders")
    parser.add_argument("--json", type=Path, help="where to write the results (and the table, as .txt)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2) + "\n"
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text, encoding="utf-8")
        if "conversions" in result:
            args.json.with_suffix(".txt").write_text(format_text(result), encoding="utf-8")
        log(f"wrote {args.json}")
    if "conversions" in result:
        print(format_text(result))


if __name__ == "__main__":
    main()
