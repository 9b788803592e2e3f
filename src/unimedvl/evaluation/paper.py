"""The paper's published numbers (EVALUATION.md 7), for side-by-side tables."""

from __future__ import annotations

# Table 1: accuracy over all test questions (%), zero-shot
UNDERSTANDING = {
    "UniMedVL": {"vqa-rad": 61.9, "slake": 75.4, "pathvqa": 53.5, "omnimedvqa": 85.8, "gmai-mmbench": 60.75},
    "Bagel": {"vqa-rad": 60.09, "slake": 58.91, "pathvqa": 39.05, "omnimedvqa": 71.13, "gmai-mmbench": 48.11},
    "HealthGPT-L14": {"vqa-rad": 58.3, "slake": 64.5, "pathvqa": 44.4, "omnimedvqa": 74.4, "gmai-mmbench": 43.1},
    "GPT-4o": {"vqa-rad": 64.08, "slake": 72.11, "pathvqa": 54.50, "omnimedvqa": 71.06, "gmai-mmbench": 57.27},
}
# Table 17: LLaVA-Med aligned protocol (mean of open recall and closed accuracy), zero-shot
ALIGNED = {
    "UniMedVL": {"vqa-rad": 57.63, "slake": 75.26, "pathvqa": 50.06},
    "LLaVA-Med": {"vqa-rad": 72.64, "slake": 83.43, "pathvqa": 64.06},
}

MODALITIES = ("CFP", "CXR", "CT", "HIS", "MRI", "OCT", "Ultrasound", "Endoscopy")
# Table 2: text-to-image gFID (lower is better) and BioMedCLIP score per modality
GFID = {
    "UniMedVL": dict(zip(MODALITIES, (53.20, 73.04, 73.04, 149.01, 90.36, 99.27, 95.38, 133.11))),
    "Bagel": dict(zip(MODALITIES, (217.19, 182.80, 163.78, 206.18, 175.74, 307.80, 255.78, 214.61))),
}
GFID_MEAN = {"UniMedVL": 96.29, "Bagel": 215.49}
BIOMEDCLIP = {
    "UniMedVL": dict(zip(MODALITIES, (0.708, 0.702, 0.696, 0.704, 0.706, 0.721, 0.706, 0.707))),
    "Bagel": dict(zip(MODALITIES, (0.650, 0.662, 0.652, 0.643, 0.639, 0.719, 0.672, 0.668))),
}
# Tables 5-6: PSNR / SSIM of the interleaved tasks
PIXEL = {
    "staining": {"UniMedVL": (20.27, 0.456), "Pyramid Pix2pix": (21.16, 0.477)},
    "sr4x": {"UniMedVL": (27.29, 0.890), "AMIR": (31.99, 0.939)},
    "t2_to_flair": {"UniMedVL": (24.90, 0.881), "ResViT": (24.97, 0.870)},
    "flair_to_t2": {"UniMedVL": (25.23, 0.883), "ResViT": (25.78, 0.908)},
}
# Table 20: MIMIC-CXR report generation
REPORT = {"UniMedVL": {"meteor": 0.2193, "bleu4": 0.0235, "rouge1": 0.2843, "rougeL": 0.2727}}
# Table 7: counterfactual CXR generation (fine-tuned variant)
COUNTERFACTUAL = {"UniMedVL†": {"gfid": 27.17, "auroc": 0.7970, "f1": 0.8731, "bleu3": 0.2641, "meteor": 0.4486, "rougeL": 0.4649}}
