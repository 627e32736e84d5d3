"""What the side-effect tasks read: each task's data folder (laid out like
``../shared/data/eval``) and MMLU's answer letters. Shared by ``tasks`` (the benchmarks)
and ``hub_data`` (which writes that layout from the hub)."""

# the data folder (and ``tasks.prepare``'s key) each task reads
DATA_OF_TASK = {"mmlu_5shot": "mmlu", "truthfulqa_mc1": "truthfulqa", "truthfulqa_mc2": "truthfulqa",
                "triviaqa_5shot": "triviaqa", "gsm8k_cot_8shot": "gsm8k"}
LETTERS = ("A", "B", "C", "D")
