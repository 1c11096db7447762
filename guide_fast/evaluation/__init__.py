"""GUIDE's evaluation (docs/guide.md §4): is the identity gone, and did nothing else change?

    from guide_fast import evaluate, EvalConfig
    result = evaluate(G_s, G_u, w_source=w, scorer="CurricularFace_Backbone.pth",
                      inception="pt_inception-2015-12-05-6726825d.pth", out_dir="eval/")
    result.metrics["id"], result.to_dict()      # eval.json

Modules: config (EvalConfig, EvalResult), views (the 11 views, ID-over-views scoring), noise
(official vs paired draws), metrics (renders, embeddings, ID / ID_others / preservation /
diversity / FID), runner (`evaluate`), plots (eval.json and the PNGs).
"""
from .config import EVAL_FORMAT, EvalConfig, EvalResult
from .metrics import fastest_identity_backend, make_scorer, pairwise_identity_similarity, quantize_like_png
from .noise import NOISE_SCHEMES
from .plots import write_outputs
from .runner import evaluate
from .views import NUM_ID_VIEWS, EvalCamera, paired_cosine, score_view_renders, view_scores, view_yaws

__all__ = ["evaluate", "EvalConfig", "EvalResult", "EvalCamera", "view_scores", "view_yaws", "score_view_renders",
           "pairwise_identity_similarity", "paired_cosine", "quantize_like_png", "fastest_identity_backend",
           "make_scorer", "write_outputs", "NUM_ID_VIEWS", "NOISE_SCHEMES", "EVAL_FORMAT"]
