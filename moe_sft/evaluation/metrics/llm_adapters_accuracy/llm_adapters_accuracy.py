"""Accuracy of generated answers on an LLM-Adapters benchmark (an `evaluate` metric).

Shipped inside moe_sft and loaded from its local path, so it works offline:

    metric = evaluate.load(moe_sft.evaluation.METRIC_PATH)
    metric.compute(predictions=generations, references=gold_answers, benchmark="gsm8k")

Each prediction is the model's raw generated text; the answer is read out of it with the
benchmark's rule in `moe_sft.evaluation.extract.RULES` (last number within 1e-3, option letter,
answer word), the way `extraction` says ("llm_adapters", the default: exactly as LLM-Adapters'
scripts; or "strict"), and compared with the reference, the record's `answer` field.
"""

import datasets
import evaluate

from moe_sft.evaluation.extract import DEFAULT_MODE, RULES, check_mode, score

_DESCRIPTION = "Accuracy after LLM-Adapters answer extraction (or a stricter one; see moe_sft.evaluation.extract)."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated texts (or, for log-likelihood scoring, the chosen answer word).
    references (list of str): gold answers (the `answer` field of the records).
    benchmark (str): a key of moe_sft.evaluation.extract.RULES, e.g. "gsm8k", "aqua", "boolq".
    extraction (str): "llm_adapters" (default; LLM-Adapters' answer reading, quirks included) or "strict".
Returns:
    accuracy (float): correct / total.
    correct (int): number of correct answers.
    total (int): number of examples.
"""

_CITATION = """
@inproceedings{hu2023llmadapters,
  title={LLM-Adapters: An Adapter Family for Parameter-Efficient Fine-Tuning of Large Language Models},
  author={Hu, Zhiqiang and Wang, Lei and Lan, Yihuai and Xu, Wanyu and Lim, Ee-Peng and Bing, Lidong and Xu, Xing and Poria, Soujanya and Lee, Roy Ka-Wei},
  booktitle={EMNLP},
  year={2023}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LlmAdaptersAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, benchmark=None, extraction=DEFAULT_MODE):
        if benchmark not in RULES:
            raise ValueError(f"benchmark={benchmark!r}; pass one of {', '.join(RULES)}")
        check_mode(extraction)
        rule = RULES[benchmark]
        correct = sum(score(rule, p, r, extraction)[1] for p, r in zip(predictions, references))
        total = len(predictions)
        return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total}
