"""`llamatune init --domain D [DIR]`: a commented recipe and data templates for a user's own corpus.

The templates hold a few original example rows in the two shapes every domain pack uses (free-text
Q&A and a closed-label classification), so `llamatune validate DIR/recipe.yaml` passes as written and the
user replaces rows rather than guessing field names. Nothing that exists is ever overwritten.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llamatune.errors import RecipeError


@dataclass(frozen=True)
class Domain:
    """What a domain scaffold contains: a task name for the classifier, its labels and sample rows."""

    title: str
    task: str  # file stem and description of the classification task
    question: str  # what the classification prompt asks
    labels: tuple[str, ...]
    qa: tuple[tuple[str, str], ...]
    classified: tuple[tuple[str, str], ...]


DOMAINS = {
    "medical": Domain(
        title="Medical",
        task="triage",
        question="How urgently does this patient message need clinical attention?",
        labels=("emergency", "urgent", "routine"),
        qa=(("What does a fasting blood glucose test measure?",
             "It measures the sugar level in the blood after at least eight hours without food, which helps detect and "
             "monitor diabetes."),
            ("Why should a course of antibiotics be taken as prescribed?",
             "Taking every dose on schedule clears the infection reliably and lowers the chance that surviving bacteria "
             "become resistant."),
            ("When is a fever in an adult a reason to seek care?",
             "Seek care for a fever above 39.4 °C (103 °F), one lasting more than three days, or any fever with a stiff "
             "neck, confusion or difficulty breathing.")),
        classified=(("My father suddenly cannot lift his right arm and his speech is slurred.", "emergency"),
                    ("I have had a painful, red, swollen area on my shin for two days and it is spreading.", "urgent"),
                    ("Could I book a review of my blood pressure tablets sometime next month?", "routine"),
                    ("My child swallowed some of my heart pills about ten minutes ago.", "emergency"),
                    ("I would like to ask whether I am due for a cervical screening test.", "routine"),
                    ("Since yesterday it burns when I pass urine and I have a temperature.", "urgent")),
    ),
    "legal": Domain(
        title="Legal",
        task="clauses",
        question="Which kind of contract clause is this?",
        labels=("confidentiality", "termination", "payment", "governing_law"),
        qa=(("What is a counter-offer?",
             "A reply that changes the terms of an offer. It rejects the original offer and becomes a new offer that the "
             "first party may accept or refuse."),
            ("What does it mean that a judgment is appealed?",
             "A party asks a higher court to review the decision for errors of law or procedure; the higher court may "
             "uphold, reverse or send the case back."),
            ("What is a limitation period?",
             "The time limit set by law within which a claim must be started; after it expires the claim is usually "
             "barred.")),
        classified=(("Each party shall keep the other's trade secrets strictly private during and after the term.", "confidentiality"),
                    ("Either party may end this agreement on ninety days' written notice to the other.", "termination"),
                    ("Invoices are payable within thirty days of receipt by bank transfer.", "payment"),
                    ("This agreement is governed by the laws of the State of New York.", "governing_law"),
                    ("The Customer shall settle each monthly invoice in euros no later than its due date.", "payment"),
                    ("The Supplier may terminate immediately if the Customer becomes insolvent.", "termination")),
    ),
    "finance": Domain(
        title="Finance",
        task="sentiment",
        question="What does this news mean for the company's shareholders?",
        labels=("positive", "negative", "neutral"),
        qa=(("What is free cash flow?",
             "Cash from operations minus capital expenditure: the cash a company generates that it could return to "
             "investors or use to pay down debt."),
            ("Why do bond prices fall when interest rates rise?",
             "Existing bonds pay fixed coupons, so when new bonds offer higher rates, the old ones must trade at a lower "
             "price to give buyers a competitive yield."),
            ("What is a stock split?",
             "A company divides each share into several, lowering the price per share without changing the total value "
             "of the company or of each holding.")),
        classified=(("Quarterly profit at Ferncastle Logistics doubled, beating every analyst forecast.", "positive"),
                    ("Ostrava Mills cut its dividend after a sharp fall in orders.", "negative"),
                    ("Brightwell Bank will publish its annual report on 12 March.", "neutral"),
                    ("Regulators fined Kelby Pharma for misleading marketing claims.", "negative"),
                    ("Lanmore Retail raised its full-year sales guidance for the second time.", "positive"),
                    ("Tarrow Energy appointed a new chief financial officer from within the company.", "neutral")),
    ),
}


def init_project(domain: str, folder: Path) -> list[Path]:
    """Writes recipe.yaml and data/*.jsonl templates for `domain` into folder.

    Returns:
        The files written.

    Raises:
        RecipeError: For an unknown domain, or when any of the files exists already (nothing is written then).
    """
    if domain not in DOMAINS:
        raise RecipeError([f"--domain: {domain!r} is not one of {', '.join(DOMAINS)}"])
    spec = DOMAINS[domain]
    rows = {
        "qa_train.jsonl": [{"question": q, "answer": a} for q, a in spec.qa[:2]],
        "qa_heldout.jsonl": [{"question": q, "answer": a} for q, a in spec.qa[2:]],
        f"{spec.task}_train.jsonl": [{"text": t, "label": lab} for t, lab in spec.classified[:4]],
        f"{spec.task}_heldout.jsonl": [{"text": t, "label": lab} for t, lab in spec.classified[4:]],
    }
    files = {folder / "recipe.yaml": _recipe(domain, spec)}
    files.update({folder / "data" / name: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data)
                  for name, data in rows.items()})
    existing = [str(p) for p in files if p.exists()]
    if existing:
        raise RecipeError([f"{p} exists; init never overwrites: choose an empty folder" for p in existing])
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
    return list(files)


def _recipe(domain: str, spec: Domain) -> str:
    labels = ", ".join(json.dumps(label) for label in spec.labels)
    return f"""# {spec.title} fine-tune of the builtin model on your own data, scaffolded by `llamatune init --domain {domain}`.
# 1. Replace the rows in data/*.jsonl with your corpus (keep the field names, or change the templates below).
#    The *_heldout files are never trained on: use different questions/texts than in *_train.
# 2. llamatune validate recipe.yaml && llamatune data check recipe.yaml
# 3. llamatune train recipe.yaml, then llamatune eval runs/<run> --compare base
# Every key: `llamatune schema`. Data paths below are relative to this file; output.dir is relative to the
# folder you run llamatune in.

model:
  path: smollm2-135m-instruct   # builtin alias | local HF folder | .gguf file | hub id 'org/name'

lora:
  r: 16                 # adapter rank: capacity of the update; 8-64 are common
  alpha: 32             # updates are scaled by alpha / r
  dropout: 0.05         # regularization for small datasets
  target_modules: all-linear

quantization:
  mode: none            # nf4 = QLoRA: 4-bit frozen base, ~4x less weight memory (slower on CPU)

data:
  # The system message of every example, a decision to record: model-default (the chat template's own; the
  # builtin's adds "You are a helpful AI assistant named SmolLM, trained by Hugging Face"), none, or your text.
  system_prompt: model-default
  train:
    - path: data/qa_train.jsonl          # free-text answers: one JSON object per line
      prompt: "{{question}}"
      response: "{{answer}}"
    - path: data/{spec.task}_train.jsonl    # {spec.task}: one label per text, from a closed set
      format: classification
      prompt: "{spec.question}\\n\\n{{text}}"
      answer: "{{label}}"
      labels: [{labels}]   # quoted: YAML reads bare yes/no/on/off as booleans
  eval:
    - path: data/qa_heldout.jsonl
      prompt: "{{question}}"
      response: "{{answer}}"
    - path: data/{spec.task}_heldout.jsonl
      format: classification
      prompt: "{spec.question}\\n\\n{{text}}"
      answer: "{{label}}"
      labels: [{labels}]
  max_length: 512       # tokens per example; longer ones are dropped and counted (data check shows them)
  packing: false

train:
  seed: 42              # reruns reproduce the same adapter
  epochs: 2             # raise for small corpora, watch the held-out loss in the run's loss.png
  micro_batch_size: 8
  grad_accum: 1         # effective batch = micro_batch_size x grad_accum x processes
  lr: 1.0e-3            # high for a 135M model; ~2e-4 for 1B+ models
  precision: auto       # bf16 where the hardware does it natively, else fp32
  log_every: 10

output:
  dir: runs             # relative to the folder llamatune runs in (not to this file)
"""
