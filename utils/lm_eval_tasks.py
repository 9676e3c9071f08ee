"""Hand-off of --tasks to EleutherAI lm-eval with the in-memory (fake-quantized) model."""
from __future__ import annotations


def evaluate_tasks(model, tokenizer, args) -> dict:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ValueError("--tasks needs lm-eval: pip install 'lm_eval[hf]'") from None
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        output = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit)
    except Exception as error:  # the harness raises many types for a task it cannot fetch
        raise ValueError(f"lm-eval could not run {tasks}: {type(error).__name__}: {str(error)[:200]} "
                         "(offline, task data must be local)") from None
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
            for task, metrics in output["results"].items()}
