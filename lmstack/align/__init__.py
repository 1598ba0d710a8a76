"""Alignment from human preferences: collection with rater QC, reward model, PPO, DPO, eval.

Data flows: prompts -> `collect.plan` (splits, 4 responses, comparisons, rater assignments,
in a `ratings.RatingStore`) -> raters at /rate (`web`) or `ai_feedback` -> `qc` ->
`collect.export_pairs` (or `data.load_pairs` for existing data) -> `reward` -> `ppo` / `dpo`
-> `evaluate`.
"""
