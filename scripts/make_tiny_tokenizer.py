"""Regenerate the bundled tokenizer of the ``tiny`` preset (src/unimedvl/assets/tiny_tokenizer).

A byte-level BPE in the Qwen2 file format (vocab.json + merges.txt) with at most 2,043 entries,
trained on the project's own prompt templates and a medical word list, so that the demo corpus and
tests tokenise into short sequences; the loader adds the four special tokens right after the
vocabulary, below the preset's 2,048 rows.  Deterministic: running it again gives the same files.

    python scripts/make_tiny_tokenizer.py
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

OUT = Path(__file__).resolve().parents[1] / "src" / "unimedvl" / "assets" / "tiny_tokenizer"
VOCAB = 2043

WORDS = """
chest x-ray radiograph ct computed tomography mri magnetic resonance ultrasound sonography histopathology
fundus photograph retina retinal oct optical coherence endoscopy colonoscopy dermoscopy skin lesion naevus
melanoma brain lung lungs heart liver kidney kidneys spleen pancreas bowel colon stomach bladder prostate
breast thyroid bone bones spine vertebra pelvis knee shoulder hip abdomen head neck thorax mediastinum
pleural effusion pneumothorax pneumonia consolidation opacity nodule mass tumour tumor cyst lesion fracture
cardiomegaly oedema edema atelectasis emphysema fibrosis calcification haemorrhage hemorrhage infarct stroke
normal abnormal unremarkable no acute finding findings impression report clinical history comparison
left right upper lower middle central anterior posterior superior inferior lateral medial bilateral
small large medium-sized mild moderate severe focal diffuse new stable increased decreased
axial coronal sagittal slice scan image images tile slide stain staining hematoxylin eosin immunohistochemistry
ihc dab her2 positive negative t1-weighted t2-weighted flair proton density contrast enhanced
generate synthesize translate segment enhance reconstruct resolution super-resolution high low
describe what which is there evidence of does this show the a an and with without in on at by for from
yes no here it its one two three four five of with vessels optic disc drusen polyp mucosa anechoic tissue
homogeneous irregular pigmented benign appearing opacity counterfactual follow-up prior developed would look
""".split()


def corpus() -> list[str]:
    import unimedvl.data.templates as T
    from unimedvl.data.procedural import GENERATORS
    from unimedvl.inference.prompts import GENERATION_SYSTEM_PROMPT, UNDERSTANDING_SYSTEM_PROMPT, report_prompt

    texts = [GENERATION_SYSTEM_PROMPT, UNDERSTANDING_SYSTEM_PROMPT, report_prompt(), report_prompt("chest X-ray")]
    labels = [lab for _, a, b in GENERATORS.values() for lab in (a, b)] + ["pleural effusion", "a nodule", "a mass"]
    for name in dir(T):
        value = getattr(T, name)
        templates = value if isinstance(value, list) else [t for v in value.values() for t in v] if isinstance(value, dict) and name.startswith("MODALITY_") and name != "MODALITY_NAMES" else []
        for t in templates:
            for modality in T.MODALITY_NAMES:
                for label in labels:
                    try:
                        texts.append(T.fill(t, modality, label=label, src="T2-weighted", dst="FLAIR"))
                    except (KeyError, IndexError):
                        pass
    texts += [" ".join(WORDS[i : i + 12]) for i in range(0, len(WORDS), 12)]
    texts += [w.capitalize() for w in WORDS] + [f"Findings: {w}. Impression: {w}." for w in WORDS]
    return sorted(set(texts))


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus() * 3, trainer)
    model = json.loads(tok.to_str())["model"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False, sort_keys=True))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (OUT / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "errors": "replace", "clean_up_tokenization_spaces": False,
        "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "model_max_length": 32768, "add_prefix_space": False,
    }, indent=1))
    print(f"wrote {OUT}: {len(model['vocab'])} entries, {len(merges)} merges")


if __name__ == "__main__":
    main()
