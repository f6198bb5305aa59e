from ..loading import load
from ..tuning.lora import OPTIMIZERS, check_run, run_lora, training_args
from .generate import TOKENIZER_HELP, add_dtype_argument, add_revision_argument


def add_arguments(p):
    p.add_argument("--model", required=True, help="converted model directory, Hub id or "
                   "reference .safetensors; a quantized model gives QLoRA (required)")
    add_revision_argument(p)
    add_dtype_argument(p)
    p.add_argument("--train", action="store_true",
                   help="train adapters (--train, --test or both)")
    p.add_argument("--test", action="store_true",
                   help="report the loss on test.jsonl (of the adapters just trained, or "
                        "of those in --adapter-path)")
    p.add_argument("--data", required=True,
                   help="directory with train.jsonl, valid.jsonl (and test.jsonl) (required)")
    p.add_argument("--iters", type=int, default=600,
                   help="training iterations, one optimizer step each (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="examples per iteration, over all processes (default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=1e-4,
                   help="the optimizer's learning rate (default: %(default)s)")
    p.add_argument("--optimizer", default="adam", choices=OPTIMIZERS,
                   help="mlx-lm's optimizers, with MLX's default settings "
                        "(default: %(default)s)")
    p.add_argument("--num-layers", type=int, default=None,
                   help="blocks to adapt, from the top: 1 or more (default: 16, or all if "
                        "fewer)")
    p.add_argument("--rank", type=int, default=8,
                   help="rank of the LoRA matrices (default: %(default)s)")
    p.add_argument("--scale", type=float, default=20.0,
                   help="LoRA scale, mlx-lm's (default: %(default)s)")
    p.add_argument("--adapter-path", default="adapters",
                   help="where the adapters are written (default: %(default)s)")
    p.add_argument("--resume-adapter-file", default=None,
                   help="adapters.safetensors to start from (default: new adapters)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute activations in the backward pass: less memory, slower")
    p.add_argument("--mask-prompt", action="store_true",
                   help="train only on completions / the last assistant turn")
    p.add_argument("--max-seq-length", type=int, default=None,
                   help="truncate longer examples (default: the model's context)")
    p.add_argument("--steps-per-report", type=int, default=10,
                   help="iterations between train loss reports (default: %(default)s)")
    p.add_argument("--steps-per-eval", type=int, default=200,
                   help="iterations between validation losses, computed before the step "
                        "of their iteration and so reported one iteration earlier "
                        "(default: %(default)s)")
    p.add_argument("--val-batches", type=int, default=25,
                   help="batches of valid.jsonl per validation; -1: all "
                        "(default: %(default)s)")
    p.add_argument("--save-every", type=int, default=100,
                   help="iterations between adapter checkpoints (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the adapters' initialisation and the batch order "
                        "(default: %(default)s)")
    p.add_argument("--tokenizer", default=None,
                   help=TOKENIZER_HELP + " (default: the model's own)")
    p.add_argument("--force", action="store_true",
                   help="replace the adapters already in --adapter-path (files genesis-mlx "
                        "did not write are kept; a directory of other files is refused)")


def run(args):
    options = training_args(
        model=args.model, train=args.train, test=args.test, data=args.data,
        iters=args.iters, batch_size=args.batch_size, learning_rate=args.learning_rate,
        optimizer=args.optimizer,
        num_layers=args.num_layers, adapter_path=args.adapter_path,
        resume_adapter_file=args.resume_adapter_file, grad_checkpoint=args.grad_checkpoint,
        mask_prompt=args.mask_prompt, seed=args.seed, max_seq_length=args.max_seq_length,
        steps_per_report=args.steps_per_report, steps_per_eval=args.steps_per_eval,
        val_batches=args.val_batches, save_every=args.save_every, force=args.force,
        lora_parameters={"rank": args.rank, "dropout": 0.0, "scale": args.scale},
    )
    # Bad options or data, or an adapter directory in the way: said before the model loads.
    check_run(options)
    model, tokenizer = load(args.model, tokenizer=args.tokenizer, revision=args.revision,
                            dtype=args.dtype)
    if options.num_layers is None:
        options.num_layers = min(16, len(model.layers))
    options.max_seq_length = options.max_seq_length or model.args.block_size
    run_lora(model, tokenizer, options)
