"""Distillation for dense-to-sparse fine-tuning (`m2_hf.distillation`): the loss, and `DistillationTrainer` in
`Trainer`'s own training loop with a Monarch student converted from its dense teacher."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Trainer, TrainingArguments

from conversion.monarch import MonarchSettings, convert_to_monarch
from m2_hf import structured_layers
from m2_hf.distillation import DistillationTrainer, logit_distillation_loss, train_only_structured_layers

VOCAB = 120


@pytest.fixture(scope="module")
def teacher_and_student_folders(tmp_path_factory):
    """A tiny dense BERT classifier and its Monarch conversion (MLPs, nblocks 4)."""
    root = tmp_path_factory.mktemp("distillation")
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(root / "dense")
    settings = MonarchSettings(targets=["mlp"], nblocks={"*": 4})
    convert_to_monarch(root / "dense", root / "monarch", settings, overwrite=False, progress=False)
    return root / "dense", root / "monarch"


def load(folder):
    return AutoModelForSequenceClassification.from_pretrained(folder)


def dataset(rows: int = 16, length: int = 12) -> Dataset:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (rows, length), generator=generator)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[::2, length // 2:] = 0  # padded rows
    return Dataset.from_dict({
        "input_ids": ids.tolist(), "attention_mask": mask.tolist(),
        "labels": torch.randint(0, 3, (rows,), generator=generator).tolist(),
    })


def arguments(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", save_strategy="no",
                    per_device_train_batch_size=4, learning_rate=1e-3, max_steps=4, seed=0, logging_steps=1,
                    dataloader_drop_last=True)
    return TrainingArguments(**{**settings, **overrides})


def test_the_loss_is_temperature_scaled_kl_divergence():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 4), torch.randn(5, 4)
    expected = (F.softmax(teacher / 3, -1) * (F.log_softmax(teacher / 3, -1) - F.log_softmax(student / 3, -1)))
    assert torch.allclose(logit_distillation_loss(student, teacher, 3.0), expected.sum(-1).mean() * 9, atol=1e-6)
    assert logit_distillation_loss(teacher, teacher, 3.0).abs() < 1e-6


def test_token_level_logits_are_distilled_where_the_mask_keeps_them():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    changed = student.clone()
    changed[0, 3:, 0] += 5.0  # only padded positions differ
    assert torch.allclose(logit_distillation_loss(student, teacher, 2.0, mask),
                          logit_distillation_loss(changed, teacher, 2.0, mask))
    assert not torch.allclose(logit_distillation_loss(student, teacher, 2.0),
                              logit_distillation_loss(changed, teacher, 2.0))


def test_a_regression_head_matches_outputs():
    student, teacher = torch.zeros(4, 1), torch.full((4, 1), 2.0)
    assert logit_distillation_loss(student, teacher, 5.0).item() == pytest.approx(4.0)


def test_mismatched_heads_are_refused():
    with pytest.raises(ValueError, match="same head"):
        logit_distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)


@pytest.mark.parametrize("bad", [dict(alpha=1.5), dict(temperature=0.0), dict(hidden_weight=-1.0)])
def test_bad_settings_are_refused(teacher_and_student_folders, tmp_path, bad):
    dense, monarch = teacher_and_student_folders
    with pytest.raises(ValueError):
        DistillationTrainer(model=load(monarch), teacher_model=load(dense), args=arguments(tmp_path), **bad)


def test_without_distillation_it_trains_exactly_as_trainer(teacher_and_student_folders, tmp_path):
    dense, monarch = teacher_and_student_folders
    plain, distilled = load(monarch), load(monarch)
    Trainer(model=plain, args=arguments(tmp_path), train_dataset=dataset()).train()
    DistillationTrainer(model=distilled, teacher_model=load(dense), alpha=0.0, args=arguments(tmp_path),
                        train_dataset=dataset()).train()
    for (name, a), b in zip(plain.state_dict().items(), distilled.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.fixture(scope="module")
def causal_lm_folders(tmp_path_factory):
    """A tiny GPT-2 and its Monarch conversion: a causal LM's forward takes loss keywords, so `Trainer` would not
    divide its loss for gradient accumulation unless told."""
    root = tmp_path_factory.mktemp("distillation-lm")
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "dense")
    settings = MonarchSettings(targets=["mlp"], nblocks={"*": 4})
    convert_to_monarch(root / "dense", root / "monarch", settings, overwrite=False, progress=False)
    return root / "dense", root / "monarch"


def language_modelling_rows(rows: int = 4) -> Dataset:
    data = dataset(rows).to_dict()
    data["labels"] = [[token if keep else -100 for token, keep in zip(ids, mask)]
                      for ids, mask in zip(data["input_ids"], data["attention_mask"])]
    return Dataset.from_dict(data)


@pytest.mark.parametrize("kind", ["classifier", "causal-lm"])
def test_gradient_accumulation_takes_the_same_step(kind, request, tmp_path):
    """The mixed loss is a batch mean: two accumulated half batches must move the weights as one whole batch."""
    folders = "teacher_and_student_folders" if kind == "classifier" else "causal_lm_folders"
    dense, monarch = request.getfixturevalue(folders)
    rows = dataset(rows=4) if kind == "classifier" else language_modelling_rows()
    auto_class = AutoModelForSequenceClassification if kind == "classifier" else AutoModelForCausalLM
    whole, halves = auto_class.from_pretrained(monarch), auto_class.from_pretrained(monarch)
    for model, batch, accumulation in ((whole, 4, 1), (halves, 2, 2)):
        teacher = auto_class.from_pretrained(dense)
        args = arguments(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                         max_steps=1, optim="sgd", learning_rate=0.1, max_grad_norm=0.0)  # clipping would hide a scale
        DistillationTrainer(model=model, teacher_model=teacher, alpha=0.5, args=args, train_dataset=rows).train()
    start = type(whole).from_pretrained(monarch).state_dict()
    for name, value in whole.state_dict().items():
        moved = value - start[name]
        assert torch.allclose(moved, halves.state_dict()[name] - start[name], atol=1e-5, rtol=1e-4), name


def test_the_student_moves_towards_its_teacher_and_the_teacher_stays(teacher_and_student_folders, tmp_path):
    dense, monarch = teacher_and_student_folders
    teacher, student = load(dense), load(monarch)
    # A teacher whose predictions differ clearly from the student's initial ones.
    torch.manual_seed(3)
    with torch.no_grad():
        teacher.classifier.weight.mul_(20).add_(torch.randn_like(teacher.classifier.weight))
    before = copy.deepcopy(teacher.state_dict())
    batch = dataset(rows=8)[:]
    inputs = {key: torch.tensor(batch[key]) for key in ("input_ids", "attention_mask")}

    def distance() -> float:
        with torch.no_grad():
            return logit_distillation_loss(student(**inputs).logits, teacher(**inputs).logits, 1.0).item()

    initial = distance()
    DistillationTrainer(model=student, teacher_model=teacher, alpha=1.0, temperature=1.0,
                        args=arguments(tmp_path, max_steps=30), train_dataset=dataset()).train()
    assert distance() < 0.5 * initial
    assert all(torch.equal(before[name], value) for name, value in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_hidden_state_matching_pulls_each_monarch_layer_towards_the_dense_one(teacher_and_student_folders, tmp_path):
    dense, monarch = teacher_and_student_folders
    teacher, student = load(dense), load(monarch)
    names = list(structured_layers(student))
    assert len(names) == 4
    batch = dataset(rows=8)[:]
    inputs = {key: torch.tensor(batch[key]) for key in ("input_ids", "attention_mask")}

    def layer_errors() -> list[float]:
        errors = []
        for name in names:
            recorded = {}
            handles = [model.get_submodule(name).register_forward_hook(
                lambda m, i, o, key=key: recorded.__setitem__(key, o)) for key, model in
                (("s", student), ("t", teacher))]
            with torch.no_grad():
                student(**inputs), teacher(**inputs)
            for handle in handles:
                handle.remove()
            errors.append(((recorded["s"] - recorded["t"]).pow(2).sum() / recorded["t"].pow(2).sum()).item())
        return errors

    initial = layer_errors()
    DistillationTrainer(model=student, teacher_model=teacher, alpha=0.0, hidden_weight=10.0,
                        args=arguments(tmp_path, max_steps=20), train_dataset=dataset()).train()
    assert sum(layer_errors()) < 0.7 * sum(initial)


def test_hidden_state_matching_needs_a_teacher_with_the_same_layers(teacher_and_student_folders, tmp_path):
    dense, monarch = teacher_and_student_folders
    other = transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, hidden_dim=64, num_labels=3))
    trainer = DistillationTrainer(model=load(monarch), teacher_model=other, hidden_weight=1.0,
                                  args=arguments(tmp_path, max_steps=1), train_dataset=dataset())
    with pytest.raises(ValueError, match="teacher has no layer named"):
        trainer.train()


BLOCKS = r"bert\.encoder\.layer\.\d+"


def test_hidden_layers_match_every_block_output_at_the_kept_positions(teacher_and_student_folders, tmp_path):
    """`hidden_layers` names the modules matched: with every BERT block named, the added loss is the mean over blocks
    of the relative error of their hidden states (what `output_hidden_states` returns), at unpadded positions."""
    dense, monarch = teacher_and_student_folders
    teacher, student = load(dense), load(monarch)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, alpha=0.0, hidden_weight=3.0,
                                  hidden_layers=[BLOCKS], args=arguments(tmp_path), train_dataset=dataset())
    assert trainer._matched_layers == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    batch = dataset(rows=4)[:]
    inputs = {key: torch.tensor(value) for key, value in batch.items()}
    kept = inputs["attention_mask"].bool()
    student.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(student, dict(inputs))
        ours = student(**inputs, output_hidden_states=True)
        theirs = teacher(**inputs, output_hidden_states=True)
    errors = [(s[kept] - t[kept]).pow(2).sum() / t[kept].pow(2).sum()
              for s, t in zip(ours.hidden_states[1:], theirs.hidden_states[1:])]
    assert len(errors) == 2 and min(errors) > 1e-6
    torch.testing.assert_close(loss, ours.loss + 3.0 * torch.stack(errors).mean())


def test_hidden_layers_must_name_modules_of_the_student(teacher_and_student_folders, tmp_path):
    dense, monarch = teacher_and_student_folders
    with pytest.raises(ValueError, match="named like 'encoder.block'.*top level: bert, dropout, classifier"):
        DistillationTrainer(model=load(monarch), teacher_model=load(dense), hidden_weight=1.0,
                            hidden_layers=["encoder.block"], args=arguments(tmp_path), train_dataset=dataset())


def pooled_features(model, inputs) -> torch.Tensor:
    """What the classifier head of a BERT classifier reads: the pooled output."""
    with torch.no_grad():
        return model.bert(**inputs).pooler_output


@pytest.mark.parametrize("cached", [False, True])
def test_feature_matching_pulls_the_student_features_towards_the_teacher_and_caches_them(
        teacher_and_student_folders, tmp_path, cached):
    dense, monarch = teacher_and_student_folders
    teacher, student, plain = load(dense), load(monarch), load(monarch)
    torch.manual_seed(4)
    with torch.no_grad():  # a teacher whose features differ clearly from the student's
        teacher.bert.pooler.dense.weight.add_(torch.randn_like(teacher.bert.pooler.dense.weight))
    batch = dataset(rows=8)[:]
    inputs = {key: torch.tensor(batch[key]) for key in ("input_ids", "attention_mask")}

    def error(model) -> float:
        s, t = pooled_features(model, inputs), pooled_features(teacher, inputs)
        return ((s - t).pow(2).sum() / t.pow(2).sum()).item()

    initial = error(student)
    common = dict(teacher_model=teacher, alpha=0.0, cache_teacher_logits=cached,
                  args=arguments(tmp_path, max_steps=20, learning_rate=5e-3), train_dataset=dataset())
    trainer = DistillationTrainer(model=student, feature_weight=10.0, **common)
    calls = count_forward_calls(teacher)
    trainer.train()
    teacher_calls = len(calls)
    DistillationTrainer(model=plain, **common).train()  # the task loss alone
    assert error(student) < 0.5 * initial and error(student) < 0.5 * error(plain)
    if cached:  # computed once, before training, with the logits: the teacher never ran during training
        assert teacher_calls == 0
        expected = pooled_features(teacher, {k: v[:3] for k, v in
                                             {k: torch.tensor(dataset()[k]) for k in inputs}.items()})
        assert torch.allclose(torch.tensor(trainer.train_dataset["teacher_features"][:3]), expected, atol=1e-5)
    else:
        assert teacher_calls == 20 and "teacher_features" not in trainer.train_dataset.column_names


def test_feature_matching_needs_a_module_that_takes_pooled_features(teacher_and_student_folders, tmp_path):
    dense, monarch = teacher_and_student_folders
    with pytest.raises(ValueError, match="The student has no module named 'head'.*classifier"):
        DistillationTrainer(model=load(monarch), teacher_model=load(dense), feature_weight=1.0, feature_module="head",
                            args=arguments(tmp_path), train_dataset=dataset())
    with pytest.raises(ValueError, match=r"input of 'bert.encoder' has shape \(3, 12, 32\)"):
        DistillationTrainer(model=load(monarch), teacher_model=load(dense), feature_weight=1.0,
                            feature_module="bert.encoder", cache_teacher_logits=True,
                            args=arguments(tmp_path, per_device_eval_batch_size=3), train_dataset=dataset())
    with pytest.raises(ValueError, match="feature_weight must be >= 0"):
        DistillationTrainer(model=load(monarch), teacher_model=load(dense), feature_weight=-1.0,
                            args=arguments(tmp_path), train_dataset=dataset())


def test_dense_to_sparse_distill_teaches_the_monarch_model_with_the_fine_tuned_dense_one(tmp_path):
    from test_examples import run_example
    from test_text_examples import (TINY_TRAINING, accuracy_of_saved_model, review_files, write_checkpoint,
                                    write_reviews)

    checkpoint, data = write_checkpoint("dense", tmp_path), review_files(tmp_path)
    results = {}
    for run, options in (("plain", []), ("distill", ["--distill", "--distill_alpha", "1.0", "--distill_hidden_weight",
                                                       "1.0", "--distill_hidden_layers", BLOCKS,
                                                       "--distill_feature_weight", "2.0"])):
        output = tmp_path / run
        run_example("dense_to_sparse.py", "--model_name_or_path", str(checkpoint), "--output_dir", str(output),
                    "--densify", "false", *data, *TINY_TRAINING, *options, cwd=tmp_path)
        results[run] = {r["model"]: r for r in json.loads((output / "results.json").read_text())}
    plain, distilled = results["plain"], results["distill"]
    assert distilled["monarch"]["distillation"] == {"alpha": 1.0, "temperature": 2.0, "hidden_weight": 1.0,
                                                    "hidden_layers": [BLOCKS], "feature_weight": 2.0,
                                                    "feature_module": "dropout",
                                                    "cached_teacher_logits": True}
    assert "distillation" not in plain["monarch"]
    # The same dense teacher; a student trained on another loss.
    assert distilled["dense"]["train_loss"] == pytest.approx(plain["dense"]["train_loss"], rel=1e-6)
    assert distilled["monarch"]["train_loss"] != pytest.approx(plain["monarch"]["train_loss"], rel=1e-3)
    card = (tmp_path / "distill/monarch/README.md").read_text()
    assert "learned from the fine-tuned dense model as teacher" in card
    assert f"layer-output weight 1.0 on {BLOCKS}" in card


def count_forward_calls(model) -> list:
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(1))
    return calls


def test_cached_teacher_logits_train_exactly_as_the_live_teacher_without_running_it(teacher_and_student_folders,
                                                                                      tmp_path):
    dense, monarch = teacher_and_student_folders
    live, cached = load(monarch), load(monarch)
    DistillationTrainer(model=live, teacher_model=load(dense), alpha=0.7, args=arguments(tmp_path, max_steps=8),
                        train_dataset=dataset()).train()
    teacher = load(dense)
    trainer = DistillationTrainer(model=cached, teacher_model=teacher, alpha=0.7, cache_teacher_logits=True,
                                  args=arguments(tmp_path, max_steps=8, per_device_eval_batch_size=3),
                                  train_dataset=dataset())
    calls = count_forward_calls(teacher)
    trainer.train()
    assert calls == [] and trainer.teacher_logits_seconds > 0
    # Shuffled batches, one pass per epoch: each example met the logits the teacher gives it.
    for (name, a), b in zip(live.state_dict().items(), cached.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    expected = load(dense)(input_ids=torch.tensor(dataset()["input_ids"][:3]),
                           attention_mask=torch.tensor(dataset()["attention_mask"][:3])).logits
    assert torch.allclose(torch.tensor(trainer.train_dataset["teacher_logits"][:3]), expected, atol=1e-5)


def test_cached_logits_with_layer_matching_still_run_the_teacher_for_its_layers(teacher_and_student_folders,
                                                                                 tmp_path):
    dense, monarch = teacher_and_student_folders
    teacher = load(dense)
    trainer = DistillationTrainer(model=load(monarch), teacher_model=teacher, hidden_weight=1.0,
                                  cache_teacher_logits=True, args=arguments(tmp_path, max_steps=2),
                                  train_dataset=dataset())
    calls = count_forward_calls(teacher)
    trainer.train()
    assert len(calls) == 2


def test_cached_logits_need_a_dataset_and_one_prediction_per_example(teacher_and_student_folders, causal_lm_folders,
                                                                       tmp_path):
    dense, monarch = teacher_and_student_folders
    rows = [dict(row) for row in dataset()]
    with pytest.raises(ValueError, match="pass a `datasets.Dataset`"):
        DistillationTrainer(model=load(monarch), teacher_model=load(dense), cache_teacher_logits=True,
                            args=arguments(tmp_path), train_dataset=rows)
    lm_dense, lm_monarch = causal_lm_folders
    with pytest.raises(ValueError, match="predicts per token"):
        DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(lm_monarch),
                            teacher_model=AutoModelForCausalLM.from_pretrained(lm_dense), cache_teacher_logits=True,
                            args=arguments(tmp_path), train_dataset=language_modelling_rows())


def test_dense_to_sparse_reuses_a_dense_run_and_projects_the_fine_tuned_model(tmp_path):
    from safetensors.torch import load_file
    from test_examples import run_example
    from test_text_examples import (TINY_TRAINING, accuracy_of_saved_model, review_files, write_checkpoint,
                                    write_reviews)

    checkpoint, data = write_checkpoint("dense", tmp_path), review_files(tmp_path)
    common = ["--model_name_or_path", str(checkpoint), "--densify", "false", *data, *TINY_TRAINING]
    run_example("dense_to_sparse.py", *common, "--output_dir", str(tmp_path / "first"), cwd=tmp_path)
    first = json.loads((tmp_path / "first/results.json").read_text())[0]
    second_dir = tmp_path / "second"
    test_file = write_reviews(tmp_path / "test.csv", 20, seed=2)
    # The student's own learning rate, here 0: it must stay what the conversion made. The reused dense model is
    # scored on the test split (--do_predict), which its own run did not score.
    stdout = run_example("dense_to_sparse.py", *common, "--output_dir", str(second_dir), "--dense_run",
                         str(tmp_path / "first"), "--convert_from", "finetuned", "--distill", "--student_learning_rate",
                         "0", "--do_predict", "--test_file", str(test_file), "--refine_steps", "4",
                         "--refine_learning_rate", "1e-3", cwd=tmp_path).stdout
    dense, monarch = json.loads((second_dir / "results.json").read_text())
    assert dense["reused_from"] == str(tmp_path / "first") and not (second_dir / "dense").exists()
    assert dense["train_seconds"] == first["train_seconds"] and dense["accuracy"] == first["accuracy"]
    assert monarch["conversion"]["source"] == "finetuned" and monarch["teacher_logits_seconds"] > 0
    # The projection was refined on the training text before fine-tuning.
    refinement = monarch["conversion"]["refinement"]
    assert refinement["steps"] == 4 and refinement["hidden_state_error_after"] < refinement["hidden_state_error_before"]
    assert (second_dir / "calibration.txt").read_text().count("\n") >= 20
    assert "| monarch |" in stdout and "test_accuracy" not in first
    assert monarch["learning_rate"] == 0 and monarch["train_examples"] == dense["train_examples"]
    trained, initial = (load_file(second_dir / f"{name}/model.safetensors") for name in ("monarch", "monarch-init"))
    assert all(torch.equal(trained[name], initial[name]) for name in initial)
    for row in (dense, monarch):
        assert row["test_samples_per_second"] > 0 and 0 <= row["test_accuracy"] <= 1
    assert dense["test_accuracy"] == pytest.approx(accuracy_of_saved_model(tmp_path / "first/dense", test_file))
    assert monarch["test_accuracy"] == pytest.approx(accuracy_of_saved_model(second_dir / "monarch", test_file))
    assert "| accuracy | f1 | test_accuracy | test_f1 | train s |" in stdout
    # The student starts from the fine-tuned dense model: its classifier is the fine-tuned one, not a new head.
    fine_tuned = load_file(tmp_path / "first/dense/model.safetensors")
    projected = load_file(second_dir / "monarch-init/model.safetensors")
    assert torch.equal(projected["classifier.weight"], fine_tuned["classifier.weight"])
    # Another seed is another dense baseline: refused, naming the difference. The second run reused the first's dense
    # model, and naming it leads to the first's (whose settings are compared).
    error = run_example("dense_to_sparse.py", *common, "--output_dir", str(tmp_path / "third"), "--dense_run",
                        str(second_dir), "--seed", "7", cwd=tmp_path, succeed=False).stderr
    assert "seed: 42 there, 7 here" in error
    error = run_example("dense_to_sparse.py", *common, "--output_dir", str(tmp_path / "fourth"), "--dense_run",
                        str(tmp_path / "nowhere"), cwd=tmp_path, succeed=False).stderr
    assert "no finished dense run there" in error


def test_only_the_structured_layers_train_and_the_optimizer_holds_nothing_else(teacher_and_student_folders, tmp_path):
    dense, monarch = teacher_and_student_folders
    student = load(monarch)
    layers = structured_layers(student)
    kept = {f"{name}.{p}" for name, layer in layers.items() for p, _ in layer.named_parameters()}
    kept |= {f"classifier.{p}" for p, _ in student.classifier.named_parameters()}
    count = train_only_structured_layers(student, also=["classifier"])
    assert count == sum(student.get_parameter(name).numel() for name in kept)
    before = copy.deepcopy(student.state_dict())
    trainer = DistillationTrainer(model=student, teacher_model=load(dense), alpha=0.5, feature_weight=1.0,
                                  args=arguments(tmp_path, max_steps=3), train_dataset=dataset())
    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(student.get_parameter(name)) for name in kept}
    for name, value in student.state_dict().items():
        assert torch.equal(value, before[name]) != (name in kept), name


def test_training_only_structured_layers_needs_them_and_known_module_names(teacher_and_student_folders):
    dense, monarch = teacher_and_student_folders
    with pytest.raises(ValueError, match="no Monarch or block-diagonal layers"):
        train_only_structured_layers(load(dense))
    with pytest.raises(ValueError, match="No module of the model is named like 'head'.*top level: bert, dropout"):
        train_only_structured_layers(load(monarch), also=["head"])


def test_dense_to_sparse_can_train_only_the_monarch_layers_of_the_fine_tuned_model(tmp_path):
    from safetensors.torch import load_file
    from test_examples import run_example
    from test_text_examples import TINY_TRAINING, review_files, write_checkpoint

    checkpoint, data = write_checkpoint("dense", tmp_path), review_files(tmp_path)
    common = ["--model_name_or_path", str(checkpoint), "--densify", "false", *data, *TINY_TRAINING]
    output = tmp_path / "run"
    run_example("dense_to_sparse.py", *common, "--output_dir", str(output), "--convert_from", "finetuned",
                "--student_trains", "structured", cwd=tmp_path)
    monarch = json.loads((output / "results.json").read_text())[1]
    trained, initial = (load_file(output / f"{name}/model.safetensors") for name in ("monarch", "monarch-init"))
    moved = {name for name in initial if not torch.equal(trained[name], initial[name])}
    monarch_layers = {name.rsplit(".", 1)[0] for name in initial if name.endswith("blkdiag1")}
    assert len(monarch_layers) == 4  # two blocks' MLPs
    assert moved == {name for name in initial if name.rsplit(".", 1)[0] in monarch_layers}
    assert monarch["trained_parameters"] == {"which": "structured", "also": [],
                                             "count": sum(initial[name].numel() for name in moved)}
    assert "Only its Monarch layers were trained" in (output / "monarch/README.md").read_text()
    error = run_example("dense_to_sparse.py", *common, "--output_dir", str(tmp_path / "refused"), "--student_trains",
                        "structured", cwd=tmp_path, succeed=False).stderr
    assert "--convert_from finetuned, or --student_also_trains classifier" in error


def test_evaluation_scores_the_student_by_its_task_loss_without_running_the_teacher(teacher_and_student_folders,
                                                                                    tmp_path):
    dense, monarch = teacher_and_student_folders
    teacher, student = load(dense), load(monarch)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, alpha=0.5, hidden_weight=1.0,
                                  feature_weight=1.0, args=arguments(tmp_path, per_device_eval_batch_size=4),
                                  eval_dataset=dataset())
    calls = count_forward_calls(teacher)
    metrics = trainer.evaluate()
    predictions = trainer.predict(dataset())
    assert calls == []
    plain = Trainer(model=student, args=arguments(tmp_path, per_device_eval_batch_size=4)).evaluate(dataset())
    assert metrics["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-6)
    assert predictions.predictions.shape == (16, 3)
    trainer.train_dataset = dataset()
    trainer.train()
    assert len(calls) == 4  # training still learns from the teacher
