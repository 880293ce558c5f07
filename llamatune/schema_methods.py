"""The recipe sections of the training methods beyond SFT (train.method): preference: for dpo / orpo, distill: for
distill; and the checks that a recipe's method, its data formats and these sections agree."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llamatune.schema_base import _Spec, conflict


class PreferenceSpec(_Spec):
    """Preference tuning (train.method: dpo / orpo): how chosen answers are pushed above rejected ones."""

    loss: Literal["sigmoid", "ipo", "simpo"] = Field(
        "sigmoid", description="dpo: sigmoid (the DPO paper's -log sigmoid(beta * margin), margin = chosen minus rejected "
        "log-ratio to the reference) | ipo (squared distance of the per-token margin from 1/(2 beta)) | simpo "
        "(reference-free: per-token log-probs, -log sigmoid(beta * margin - simpo_gamma); beta ~2 suits it).")
    beta: float = Field(0.1, gt=0, le=100, description="dpo: strength of the preference against the reference (higher = "
                        "stay closer to it; TRL's default 0.1).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo sigmoid: the share of pairs assumed mislabelled "
                                   "(conservative DPO): the loss also rewards the flipped preference by this share.")
    simpo_gamma: float = Field(0.5, ge=0, description="dpo simpo: target margin between the per-token log-probs.")
    sft_weight: float = Field(0.0, ge=0, le=100, description="dpo: weight of the chosen answers' next-token loss "
                              "(per token) added to the DPO loss, as RPO does (TRL: loss_type [sigmoid, sft]): keeps the "
                              "chosen answers likely while the margin grows; 0 = plain DPO.")
    orpo_lambda: float = Field(0.1, gt=0, le=100, description="orpo: weight of the odds-ratio term next to the chosen "
                               "answer's next-token loss (TRL's ORPO beta, default 0.1).")
    reference: Literal["base", "adapter_start"] = Field(
        "base", description="dpo: the frozen reference model: base (the model with the adapter disabled: no second copy) "
        "| adapter_start (the adapter model.adapter starts from, frozen; its log-probs are computed once before the "
        "first step).")




class DistillSpec(_Spec):
    """Distillation (train.method: distill): the student (this recipe's model, trained with LoRA) learns the teacher's
    next-token distributions on the training answers, from the teacher's top-k log-probs computed once and cached."""

    teacher: str | None = Field(
        None, description="The teacher: a finished run directory (its base with its adapter), a merged model folder, a "
        ".gguf file, a builtin alias or a hub id. It must share the student's vocabulary. Relative paths: the recipe's "
        "folder.")
    top_k: int = Field(32, ge=1, le=1_000_000, description="Teacher log-probs kept per trained position (the rest of its "
                       "probability is kept as one tail mass). The cache grows with it: 8 bytes per position per k.")
    temperature: float = Field(1.0, gt=0, le=20, description="Softens both distributions before they are compared "
                               "(log_softmax(logits / T)); the distillation loss is multiplied by T^2 so its gradients keep "
                               "their scale (Hinton et al.).")
    kd_ratio: float = Field(0.5, ge=0, le=1, description="Loss = kd_ratio x distillation loss + (1 - kd_ratio) x the "
                            "usual next-token loss on the labels, both per trained token. 0 = SFT alone.")
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="forward_kl (KL(teacher || student): cover everything the teacher deems likely) | "
        "reverse_kl (KL(student || teacher): mode-seeking) | jsd (Jensen-Shannon, symmetric, bounded). Each on the "
        "teacher's top-k tokens plus one bucket for all other tokens: exact when top_k is the vocabulary size.")
    train_extra: Literal["none", "norms", "neighbours"] = Field(
        "none", description="Besides LoRA, also train: none | norms (every RMSNorm weight, fully) | neighbours (the "
        "decoder layers next to the blocks `llamatune prune` removed, fully: their LoRA is left out). A pruned student "
        "needs some repair a low-rank update cannot give; neighbours needs a student written by llamatune prune.")


PREFERENCE_FORMATS = ("preference",)


def method_problem(recipe):
    """The first disagreement between train.method, the data formats and the method sections, as a conflict error
    naming its keys; None when they agree. By value, not by fields set: a run's resolved recipe (what merge and resume
    read back) writes every section out with its defaults."""
    method = recipe.train.method
    sources = [(f"data.{split}.{i}.format", s.format) for split, group in (("train", recipe.data.train),
               ("eval", recipe.data.eval or ())) for i, s in enumerate(group)]
    if method != "distill" and recipe.distill != DistillSpec():
        return conflict(("train.method", "distill"), "the distill: section is only read by train.method: distill; "
                        "remove it, or set the method")
    if method in ("sft", "distill"):
        wrong = [key for key, fmt in sources if fmt in PREFERENCE_FORMATS]
        if wrong:
            return conflict(("train.method", *wrong), "format: preference data (chosen / rejected pairs) trains with "
                            f"train.method: dpo or orpo; {method} needs answers to imitate (format: instruction with "
                            "response: '{chosen}' trains on the chosen answers)")
        if recipe.preference != PreferenceSpec():
            return conflict(("train.method", "preference"), "the preference: section is only read by train.method dpo "
                            "or orpo; remove it, or set the method")
        if method == "distill" and recipe.distill.teacher is None:
            return conflict(("train.method", "distill"), "train.method: distill needs distill.teacher: the run directory, "
                            "model folder, .gguf or model name whose answers the student learns")
        return None
    wrong = [key for key, fmt in sources if fmt not in PREFERENCE_FORMATS]
    if wrong:
        return conflict(("train.method", *wrong), f"train.method: {method} trains on chosen / rejected pairs: every "
                        "source needs format: preference (prompt, chosen, rejected)")
    pref, default = recipe.preference, PreferenceSpec()
    changed = {k for k in type(pref).model_fields if getattr(pref, k) != getattr(default, k)}
    dpo_only = {"loss", "beta", "label_smoothing", "simpo_gamma", "reference", "sft_weight"}
    if method == "orpo" and (dpo_only & changed):
        keys = sorted(dpo_only & changed)
        return conflict(tuple(f"preference.{k}" for k in keys), "orpo has no reference model and no DPO loss variant; "
                        "its only setting is preference.orpo_lambda (its next-token term is always on; or use train.method: dpo)")
    if method == "dpo" and "orpo_lambda" in changed:
        return conflict(("preference.orpo_lambda", "train.method"), "orpo_lambda is read by train.method: orpo only")
    if pref.label_smoothing and pref.loss != "sigmoid":
        return conflict(("preference.label_smoothing", "preference.loss"), f"label smoothing is defined for the "
                        f"sigmoid loss only, not {pref.loss}")
    if pref.reference == "adapter_start" and recipe.model.adapter is None:
        return conflict(("preference.reference", "model.adapter"), "reference: adapter_start needs model.adapter (the "
                        "run whose adapter this one starts from); without it the start is the base model: use "
                        "reference: base")
    return None
