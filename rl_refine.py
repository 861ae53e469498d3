"""Stage 2 of MARVAL (Gu et al. 2025, arXiv:2511.15190): MARVAL-RL, reward back-propagation through generation.

With one-step heads, a whole image is K AR iterations of (transformer + one head call), then the VAE decoder: short
enough to differentiate end to end. The reward model's gradient then flows into the generator:

    image = decode(sample_tokens(K, one-step head))    differentiable; every AR step under torch.utils.checkpoint
    loss  = -mean R(image, prompt) + beta * mean |x0_policy - x0_frozen|^2

R is PickScore (paper), an open_clip CLIP score, ImageReward (--reward imagereward), or on the toy the toy
classifier's log-probability of the requested digit. Prompts are ImageNet entity names (open_clip's bundled
IMAGENET_CLASSNAMES), one per sampled class.

Reward back-propagation is known to hack the reward (AlignProp, DRaFT, ReFL): the images drift toward what the reward
model likes and away from the data. Two guards: a regulariser toward the frozen starting policy (DRaFT+, NVIDIA
NeMo-Aligner 2024, adds to DRaFT a penalty between the tuned and the frozen model's eps predictions; here: for the
SAME context and noise at every AR step, the squared difference of the one-step outputs
x0 = 1.24 z - 0.74 eps_hat, i.e. 0.74^2 |eps_hat - eps_hat_ref|^2), and model selection (checkpoint-best.pth,
besides checkpoint-last.pth: note 1).

Reads --student (a MAR-format checkpoint, from distill_gsim.py). Writes to --out-dir checkpoint-last.pth and
checkpoint-best.pth (official MAR format: model + model_ema), log.jsonl (mean train reward, held-out reward, accuracy,
toy FID; with --watch-classifier an independent evaluator's accuracy and class similarity), and on the toy
reward_vs_fid.png (the trade-off over training, and the independent accuracy beside it) and eval.json.

    # toy, CPU, a few minutes (after distill_gsim.py --preset toy)
    python rl_refine.py --preset toy --student runs/toy_student/checkpoint-last.pth --out-dir runs/toy_rl
    # ImageNet with PickScore, one GPU
    python rl_refine.py --student marval_base.pth --vae kl16.ckpt --model mar_base --reward pickscore \
        --pickscore-model PickScore_v1/ --pickscore-processor CLIP-ViT-H-14/ --global-batch-size 2 --out-dir runs/rl_b
    # ImageNet with PickScore, 8 GPUs (paper: K = 64, AdamW lr 5e-6, 2 per GPU, EMA 0.9999, 5 epochs)
    torchrun --nproc_per_node=8 rl_refine.py --student marval_base.pth --vae kl16.ckpt --model mar_base \
        --reward pickscore --pickscore-model PickScore_v1/ --pickscore-processor CLIP-ViT-H-14/ --out-dir runs/rl_b
    # CPU smoke run
    python rl_refine.py --preset toy --student runs/toy_student/checkpoint-last.pth --max-steps 3 --eval-every 0 \
        --out-dir runs/smoke_rl

Deliberate choices where the paper is silent:
  1. The regulariser (--reg-weight) and the guarded selection are ours (DRaFT+ above); the paper
     reports no guard against reward hacking. checkpoint-best.pth is the best held-out reward among the evaluations
     whose held-out DRaFT+ distance to the start stays within --max-drift (and on the toy whose FID stays within
     --fid-bound x the start's). The held-out prompts are spread over all classes.
  2. Run length. "5 epochs" has no stated unit for a data-free stage. Read as 5 passes over the 1,000 class names it
     is 5 x 1000 / 16 = 315 steps, about 9 minutes of 8 A100s: two orders of magnitude below the paper's "~2 days on
     8 A100". Read as 5 passes over ImageNet's 1,281,167 training labels (--epoch-size) at global batch 16 it is
     400,365 steps, 0.43 s per step over 2 days (172,800 s). That matches the compute of one step: MAR-B's
     transformer (~172M parameters in its blocks, ~190 encoder and 320 decoder positions) over K = 64 AR steps for 2
     images is ~11 TFLOP forward, ~45 TFLOP with the backward and the per-step recomputation; the KL-16 decoder and
     PickScore's ViT-H/14 add ~3 TFLOP; ~48 TFLOP at ~40% of an A100's 312 TFLOP/s is ~0.4 s. So the default is
     --epochs 5 over --epoch-size 1281167. The FLOPs agree with bench.py's count (46.8 TFLOP), but at 2 images per
     GPU the step is launch-bound: ~145,000 kernel launches, which bench.py's time model prices at 2.2 s on an A100,
     10 days for the default length (docs/results.md section 12). Time a few steps on yours and set --max-steps.
  3. EMA 0.9999 [Table 2] WITH a warm-up, decay min(0.9999, (1 + n) / (10 + n)) (--no-ema-warmup for the literal
     one): model_ema is what every tool loads, and a fixed 0.9999 keeps only 1 - 0.9999^n of n steps' updates
     (3% after 315 steps). With the warm-up a short run shows in model_ema; from step ~90,000 on it is the same EMA.
  4. The whole student (transformer + head) is tuned by default (--head-only to tune the head alone).
  5. Gradients through all K steps by default; --truncate-k k keeps only the last k AR steps (DRaFT-K).
  6. The reward sees the decoded image clamped to [-1, 1], as the saved PNGs are (rewards.clip_preprocess).
"""
import argparse
import copy
import functools
import json
import os

import torch

import data
import evaluate
import common
import figures
import mar
import rewards

# ----------------------------------------------------------------------------------------------------------------
# The differentiable generation and the loss (one RL step)
# ----------------------------------------------------------------------------------------------------------------


def build_reward(args, device):
    """(reward fn(images in [-1, 1], labels) -> (B,), toy evaluator or None)."""
    if args.reward == "toy":
        ev = evaluate.ToyEvaluator(args.classifier)
        ev.net.to(device).requires_grad_(False)
        return ev.log_prob, ev
    if args.reward == "pickscore":
        fn = rewards.PickScoreReward.from_dirs(args.pickscore_model,
                                               args.pickscore_processor or args.pickscore_model)
    elif args.reward == "imagereward":
        fn = rewards.load_imagereward(args.imagereward_weights, args.imagereward_tokenizer)
    else:
        fn = rewards.ClipReward(args.clip_model, args.clip_weights)
    return fn.to(device), None


class RLSteps:
    """The AR steps of a generation with gradients: `run_step` for `MAR.sample_tokens` (reward back-propagation
    through generation: DRaFT, Clark et al. 2023, arXiv:2309.17400, here through all K AR steps).

    Each step runs under torch.utils.checkpoint (`use_checkpoint`: K steps' activations would not fit at K = 64),
    keeps its graph only in the last `truncate_k` of the `num_iter` steps (DRaFT-K; None: all; a step with nothing to
    reveal, possible when num_iter > L, still counts), and, given a frozen `reference` MAR, runs the reference's own
    AR step on the same inputs (tokens so far, detached, and the same noise) to record the tokens it would write,
    for the DRaFT+ `penalty`. The sampler draws a step's noise before the step, so recomputation is exact."""

    def __init__(self, num_iter, use_checkpoint=True, truncate_k=None, reference=None):
        self.num_iter, self.use_checkpoint = num_iter, use_checkpoint
        self.truncate_k, self.reference = truncate_k, reference
        self.records = []  # (pos (B, k), the reference's tokens there (B, k, C)) per AR step

    def __call__(self, step, ar_step, tokens, mask, n_masked, pos, noise):
        if step >= self.num_iter:
            raise ValueError(f"AR step {step} of a sampler run longer than RLSteps' num_iter = {self.num_iter}")
        if self.reference is not None:  # ar_step = partial(policy._ar_step, labels=, head=, cfg=): the same for ref
            ref_step = functools.partial(self.reference._ar_step, **ar_step.keywords)
            with torch.no_grad():
                self.records.append((pos, mar.gather_rows(ref_step(tokens.detach(), mask, n_masked, pos, noise), pos)))
        track = self.truncate_k is None or step >= self.num_iter - self.truncate_k
        with torch.set_grad_enabled(torch.is_grad_enabled() and track):
            if self.use_checkpoint and torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(ar_step, tokens, mask, n_masked, pos, noise,
                                                         use_reentrant=False)
            return ar_step(tokens, mask, n_masked, pos, noise)

    def penalty(self, tokens, per_image=False):
        """DRaFT+ penalty: over the AR steps, the mean of each step's mean squared difference between the tokens the
        policy wrote (held, with their graph, by the final `tokens` (B, L, C)) and the reference's; 0 without a
        reference. Each AR step weighs the same whatever its token count (MAR's schedule reveals few tokens early,
        many late), so the value depends on K; steps outside `truncate_k` count in it without a gradient.
        per_image: the (B,) values whose mean is the batch's (every image reveals the same count at a step)."""
        if not self.records:
            return torch.zeros(len(tokens) if per_image else (), device=tokens.device)
        per_step = torch.stack([(mar.gather_rows(tokens, pos) - ref).float().square().mean((1, 2))  # (B,) each step
                                for pos, ref in self.records])                                     # (steps, B)
        return per_step.mean(0) if per_image else per_step.mean()


def generate_with_reference(policy, reference, labels, gens, args):
    """K-step generation of the one-step student with gradients (`RLSteps`), and the DRaFT+ penalty toward the
    frozen `reference` (None: no penalty), the second term of

        loss = -R(decode(x), prompt) + beta * mean_k |x0_k - x0_k^ref|^2,   x0_k^ref from the frozen model, same inputs

    Returns (latents (B, C, H, W), penalty)."""
    steps = RLSteps(args.num_iter, not args.no_checkpoint_steps, args.truncate_k, reference)
    latents = policy.sample_tokens(len(labels), num_iter=args.num_iter, labels=labels,
                                   head=mar.HeadSampler(one_step=True), generator=gens, run_step=steps)
    return latents, steps.penalty(policy.patchify(latents))


def run_length(args):
    """Default number of steps: --epochs passes over --epoch-size prompts at the global batch (note 2)."""
    return args.epochs * -(-args.epoch_size // args.global_batch_size)


def heldout_labels(n, n_classes):
    """Held-out classes: spread over all classes (ImageNet: 400 prompts -> classes 0, 2, 5, 7, ..., 997), or every
    class in turn when there are fewer classes than prompts (the toy)."""
    return torch.arange(n) * n_classes // n if n < n_classes else torch.arange(n) % n_classes


def rl_step(policy, reference, tokenizer, reward_fn, labels, gens, opt, args):
    """One MARVAL-RL update: generate a batch with gradients (K AR steps of the one-step head, then the decoder), score
    it, and step the optimizer on

        loss = -mean_b R(decode(x_b), prompt_b) + beta * penalty

    (reward back-propagation: DRaFT, Clark et al. 2023, arXiv:2309.17400; the penalty: DRaFT+,
    `generate_with_reference`)

    with beta = args.reg_weight: 0 by default (the paper's plain reward loss), 1 in the toy's defaults, where an
    unguarded run hacks the reward (note 1). labels (B,) classes, whose prompts the reward scores; gens: one generator
    per image; opt: the optimizer over the trainable parameters (one group), whose gradients are averaged over ranks
    and clipped to args.grad_clip. Runs under bf16 autocast when args.precision is "bf16". Returns 0-d tensors."""
    trainable = opt.param_groups[0]["params"]
    with torch.autocast(labels.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        latents, penalty = generate_with_reference(policy, reference if args.reg_weight > 0 else None, labels, gens,
                                                   args)
        reward = reward_fn(tokenizer.decode(latents), labels)                         # (B,)
        loss = -reward.mean() + args.reg_weight * penalty
    opt.zero_grad(set_to_none=True)
    loss.backward()
    common.all_reduce_grads(trainable)
    gnorm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
    opt.step()
    return {"reward": reward.mean().detach(), "penalty": penalty.detach(), "loss": loss.detach(), "grad_norm": gnorm}


@torch.no_grad()
def held_out(model, reference, tokenizer, reward_fn, evaluator, args, n_classes, watcher=None):
    """Fixed labels and seeds (image i from HELDOUT_SEED + i): mean reward, the DRaFT+ distance to the frozen start
    (`drift`: the penalty term on the held-out generations), and on the toy accuracy and toy FID of the same images;
    with a `watcher` (an evaluator the reward never uses) its accuracy and class similarity too, the check for reward
    hacking. Returns (that dict, images (N, C, H, W) in [-1, 1] or None off the toy, labels (N,)).

    Every rank calls it and makes its share, under the training step's precision: the set is cut into chunks of
    EVAL_CHUNK images (the unit of one generation call), chunk c made by rank c mod world; the chunks' numbers are
    gathered, so every rank returns the same dict, and the same to the bit as one process (each chunk is the same
    computation whatever the number of ranks)."""
    device = model.fake_latent.device
    labels = heldout_labels(args.eval_images, n_classes).to(device)
    chunks = torch.arange(len(labels)).split(EVAL_CHUNK)
    rewards_, drifts, images = {}, {}, {}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    for c in common.my_share(len(chunks)):
        idx = chunks[c].tolist()
        lb = labels[idx[0]: idx[-1] + 1]
        gens = [torch.Generator(device).manual_seed(HELDOUT_SEED + i) for i in idx]
        steps = RLSteps(args.num_iter, False, None, reference)
        with autocast:
            lat = model.sample_tokens(len(lb), num_iter=args.num_iter, labels=lb, head=mar.HeadSampler(one_step=True),
                                      generator=gens, run_step=steps)
            x = tokenizer.decode(lat)                                                   # (b, C, H, W)
            rewards_[c] = reward_fn(x, lb).float()                                      # (b,)
        drifts[c] = steps.penalty(model.patchify(lat), per_image=True)                  # (b,)
        if evaluator is not None:
            images[c] = x.float()
    scores, drift = common.gather_indexed(rewards_), common.gather_indexed(drifts)      # (N,) each, index order
    out = {"heldout_reward": scores.mean().item(), "drift": drift.mean().item()}
    imgs = None
    if evaluator is not None:
        imgs = common.gather_indexed(images)                                             # (N, C, H, W)
        m = evaluator(imgs, labels)
        out.update(heldout_accuracy=m["accuracy"], toy_fid=m["toy_fid"])
    if watcher is not None:
        out.update(independent_accuracy=watcher(imgs, labels)["accuracy"],
                   independent_similarity=watcher.similarity(imgs, labels).mean().item())
    return out, imgs, labels


def plot_tradeoff(history, path):
    """Held-out reward against toy FID over training (points labelled by step) and, with --watch-classifier, the
    independent evaluator's accuracy against step beside it: does the reward gain hold for a judge never optimised?
    Toy FID exists only with --reward toy, so the reward here is the toy classifier's log p(label | image)."""
    pts = [h for h in history if "toy_fid" in h]
    if len(pts) < 2:
        return
    a, b = pts[0], pts[-1]
    panels = [dict(title="RL: held-out reward vs toy FID (labels: step)",
                   xlabel="toy FID of the held-out set (lower is better)",
                   ylabel="held-out reward: log p(label | image), nats",
                   series=[("policy (EMA)", [(h["toy_fid"], h["heldout_reward"], h["step"]) for h in pts])],
                   note=f"step {a['step']}: reward {a['heldout_reward']:.3f}, FID {a['toy_fid']:.2f};  "
                        f"step {b['step']}: reward {b['heldout_reward']:.3f}, FID {b['toy_fid']:.2f}")]
    if "independent_accuracy" in pts[0]:
        panels.append(dict(title="accuracy over training", xlabel="RL step", ylabel="held-out accuracy (fraction)",
                           series=[("reward's classifier", [(h["step"], h["heldout_accuracy"], None) for h in pts]),
                                   ("independent (never optimised)",
                                    [(h["step"], h["independent_accuracy"], None) for h in pts])],
                           note=f"independent: {a['independent_accuracy']:.3f} -> {b['independent_accuracy']:.3f}"))
    figures.plot_panels(panels, path)


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------

# Selection guard outside the toy (note 1): the held-out DRaFT+ distance, a mean squared difference of one-step outputs
# (MAR latents have unit variance) to the frozen start for the same context and noise. Calibrated on the toy only
# (docs/results.md section 9): in an unguarded run the last evaluation with toy FID <= 1.3x the start's had drift
# 0.022 of the data's variance, the next one (FID 1.40x) 0.035. Recheck on a real run (log.jsonl holds the drift of
# every evaluation).
MAX_DRIFT = 0.025
# Seeds: the held-out set's image i is drawn from seed HELDOUT_SEED + i at every evaluation (the same images each
# time); a training step's image b from step_seed * STEP_STRIDE + b, distinct within a step while the per-rank
# batch is below STEP_STRIDE (checked in main), and step seeds distinct over every (rank, step) of a run.
HELDOUT_SEED, STEP_STRIDE = 90_000, 131
# What defines an RL run besides its --student: --resume refuses a checkpoint made with other values.
RESUME_KEYS = ("preset", "model", "img_size", "reward", "num_iter", "global_batch_size", "head_only", "reg_weight",
               "seed")
EVAL_CHUNK = 25  # held-out images per generation call: 400 are 16 chunks, two for each of 8 ranks
TOY_DEFAULTS = dict(out_dir="runs/toy_rl", reward="toy", num_iter=4, global_batch_size=32, lr=2e-6,
                    reg_weight=1.0, max_steps=150, eval_every=25, log_every=5, save_every=25)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("setup")
    g.add_argument("--preset", choices=["toy"], default=None)
    g.add_argument("--model", choices=list(mar.PRESETS), default="mar_base")
    g.add_argument("--img-size", type=common.COUNT, default=256, help="image size of the student (MAR: 256)")
    g.add_argument("--student", required=True, help="MAR-format checkpoint of the distilled student (EMA weights)")
    g.add_argument("--vae", default=None, help="local kl16.ckpt (ImageNet)")
    g.add_argument("--out-dir", default=None, help="--preset toy: runs/toy_rl")
    g.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint-last.pth if present")
    g.add_argument("--overwrite", action="store_true", help="start over in an --out-dir that holds a checkpoint")
    g.add_argument("--max-steps", type=common.COUNT, default=None,
                   help="default: --epochs x --epoch-size / global batch")
    g.add_argument("--seed", type=common.SEED, default=1)
    g.add_argument("--device", type=common.device_arg, default=None)
    common.add_run_flags(g)
    g = p.add_argument_group("reward")
    g.add_argument("--reward", choices=["pickscore", "clip", "imagereward", "toy"], default="pickscore")
    g.add_argument("--pickscore-model", default=None, help="local directory of yuvalkirstain/PickScore_v1")
    g.add_argument("--pickscore-processor", default=None, help="local dir of laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    g.add_argument("--clip-model", default="ViT-H-14", help="open_clip architecture (--reward clip)")
    g.add_argument("--clip-weights", default=None, help="local open_clip weights file (--reward clip)")
    g.add_argument("--imagereward-weights", default=None, help="local ImageReward.pt (--reward imagereward)")
    g.add_argument("--imagereward-tokenizer", default=None, help="local bert-base-uncased folder (with the above)")
    g.add_argument("--classifier", default="runs/toy_classifier.pt", help="toy reward / evaluator")
    g.add_argument("--watch-classifier", default=None, help="toy: an independent evaluator (pixel MLP, trained on "
                   "first use) whose accuracy and class similarity are logged but never optimised")
    g = p.add_argument_group("generation and optimisation (paper defaults, MARVAL Table 2)")
    g.add_argument("--num-iter", type=common.COUNT, default=64, help="AR iterations K of the differentiated generation")
    g.add_argument("--truncate-k", type=common.COUNT, default=None,
                   help="back-propagate through the last k AR steps only")
    g.add_argument("--no-checkpoint-steps", action="store_true", help="keep all K steps' activations (more memory)")
    g.add_argument("--head-only", action="store_true", help="tune the diffusion head only")
    g.add_argument("--global-batch-size", type=common.COUNT, default=16, help="paper: 2 per GPU x 8 GPUs")
    g.add_argument("--epochs", type=common.COUNT, default=5, help="paper: 5 (see note 2 for the unit)")
    g.add_argument("--epoch-size", type=common.COUNT, default=1_281_167,
                   help="prompts per epoch: ImageNet's training labels")
    g.add_argument("--lr", type=common.POSITIVE, default=5e-6)
    g.add_argument("--weight-decay", type=common.NONNEG, default=0.0)
    g.add_argument("--grad-clip", type=common.POSITIVE, default=1.0)
    g.add_argument("--ema-rate", type=common.FRACTION, default=0.9999, help="0: no EMA (model_ema = model)")
    g.add_argument("--no-ema-warmup", action="store_true", help="the literal fixed-rate EMA (see note 3)")
    g.add_argument("--reg-weight", type=common.NONNEG, default=0.0,
                   help="beta of the DRaFT+ penalty toward the frozen start")
    g.add_argument("--precision", choices=["fp32", "bf16"], default=None)
    g = p.add_argument_group("logging and selection")
    g.add_argument("--log-every", type=common.COUNT, default=10)
    g.add_argument("--save-every", type=common.COUNT0, default=0,
                   help="also save every N steps (0: by --save-minutes only)")
    g.add_argument("--eval-every", type=common.COUNT0, default=100, help="held-out reward (and toy FID) every N steps")
    g.add_argument("--eval-images", type=common.COUNT0, default=400, help="held-out set: fixed labels and seeds")
    g.add_argument("--fid-bound", type=common.number(float, 1), default=1.3,
                   help="toy: best held-out reward with FID <= bound x start")
    g.add_argument("--max-drift", type=common.POSITIVE, default=MAX_DRIFT,
                   help="best held-out reward with DRaFT+ distance "
                   "(mean squared one-step output difference to the start, held-out) at most this")
    args = p.parse_args(argv)
    if args.preset == "toy":
        p.set_defaults(**TOY_DEFAULTS)
        args = p.parse_args(argv)
    elif not args.vae:
        p.error("--vae (the local kl16.ckpt) is needed to decode images for the reward")
    if args.out_dir is None:
        p.error("--out-dir is required: the folder for checkpoint-last.pth and log.jsonl")
    if args.reward == "pickscore" and not args.pickscore_model:
        p.error("--reward pickscore needs --pickscore-model (and --pickscore-processor) local directories")
    if args.reward == "clip" and not args.clip_weights:
        p.error("--reward clip needs --clip-weights (a local open_clip weights file)")
    if args.reward == "imagereward" and not (args.imagereward_weights and args.imagereward_tokenizer):
        p.error("--reward imagereward needs --imagereward-weights (ImageReward.pt) and --imagereward-tokenizer "
                "(a local bert-base-uncased folder)")
    if args.truncate_k is not None and args.truncate_k > args.num_iter:
        p.error(f"--truncate-k {args.truncate_k} is more than the --num-iter {args.num_iter} AR steps")
    return args


def check_inputs(args):
    """Before any work: every file and folder the run reads exists and is of the kind expected."""
    common.input_path("--student", args.student, "the distilled student's checkpoint (distill_gsim.py's)")
    if args.preset != "toy":
        common.input_path("--vae", args.vae, "the local kl16.ckpt")
    if args.reward == "pickscore":
        common.input_path("--pickscore-model", args.pickscore_model, "the local yuvalkirstain/PickScore_v1 folder",
                          folder=True)
        processor = args.pickscore_processor or args.pickscore_model
        common.input_path("--pickscore-processor", processor, "the local laion/CLIP-ViT-H-14 processor folder",
                          folder=True)
        if not os.path.isfile(os.path.join(args.pickscore_model, "config.json")):
            raise common.UsageError(f"--pickscore-model {args.pickscore_model} holds no config.json: give the folder "
                                    "a transformers save_pretrained (or a hub snapshot) of PickScore_v1 wrote")
    if args.reward == "clip":
        common.input_path("--clip-weights", args.clip_weights, "a local open_clip weights file")
    if args.reward == "imagereward":
        common.input_path("--imagereward-weights", args.imagereward_weights, "the released ImageReward.pt")
        common.input_path("--imagereward-tokenizer", args.imagereward_tokenizer, "a local bert-base-uncased folder",
                          folder=True)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    check_inputs(args)
    rank, world, device, bsz = common.start_run(args, [("--student", args.student)], ("reward_vs_fid.png",
                                                                                      "grid_best.png"))
    if bsz >= STEP_STRIDE:  # the images of one step would share seeds
        raise common.UsageError(f"--global-batch-size {args.global_batch_size}: {bsz} per process; RL takes at most "
                                f"{STEP_STRIDE - 1} per process (use more processes)")
    toy = args.preset == "toy"
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")  # resolved (and saved so)

    # -- models: policy (trained), frozen reference (the start), EMA -------------------------------------------------
    build = (lambda: data.toy_model_of(args.student)) if toy else \
        (lambda: mar.PRESETS[args.model](img_size=args.img_size))
    with common.reading("--student", args.student):
        policy = mar.load_mar(args.student, build(), use_ema=True, verbose=common.is_main(), expect="student")
        tokenizer = data.toy_tokenizer_of(args.student, device) if toy else None
    policy = policy.to(device).eval()
    reference = copy.deepcopy(policy).requires_grad_(False)
    policy.requires_grad_(not args.head_only)
    policy.diffloss.net.requires_grad_(True)
    ema = copy.deepcopy(policy).requires_grad_(False)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    # the decoder the reward's gradient crosses: KL-16, or the toy VAE the student's checkpoint carries
    if not toy:
        import vae as vae_lib
        with common.reading("--vae", args.vae):
            tokenizer = data.Tokenizer(vae_lib.load_vae(args.vae).to(device).requires_grad_(False))
    reward_flag = {"pickscore": "--pickscore-model", "clip": "--clip-weights", "imagereward": "--imagereward-weights",
                   "toy": "--classifier"}[args.reward]
    with common.reading(reward_flag, getattr(args, reward_flag[2:].replace("-", "_"))):
        reward_fn, evaluator = build_reward(args, device)
    # the independent judge: a pixel MLP (another architecture and seed), created on first use, never differentiated
    watcher = evaluate.ToyEvaluator(args.watch_classifier, kind="mlp", seed=1) if toy and args.watch_classifier \
        else None
    n_classes = policy.class_num
    total = args.max_steps or run_length(args)
    step, history, best = 0, [], None
    ckpt_path = os.path.join(args.out_dir, "checkpoint-last.pth")
    record = common.run_record("rl_refine.py", args, RESUME_KEYS,
                               {"--student": (args.student, common.fingerprint(reference.state_dict()))})
    if args.resume and os.path.exists(ckpt_path):
        with common.reading("--resume", ckpt_path):
            ck = mar.read_checkpoint(ckpt_path)
            common.check_record(ck, record, ckpt_path)
            mar.load_state_dict_strict(policy, ck["model"], ckpt_path)
            mar.load_state_dict_strict(ema, ck["model_ema"], ckpt_path + " [model_ema]")
            opt.load_state_dict(ck["optimizer"])
            step, history, best = ck["step"], ck["history"], ck["best"]
        common.print0(f"resumed from {ckpt_path} at step {step}")

    diverged = f"lower --lr (now {args.lr})"

    def save(path):
        common.assert_finite(policy, diverged)  # every rank: the same weights, the same verdict
        if common.is_main():
            extra = data.toy_entries(tokenizer, data.toy_config_of(args.student)) if toy else {}
            common.save_checkpoint(path, {"kind": "student", "record": record, "model": policy.state_dict(),
                                          "model_ema": ema.state_dict(),
                                          "optimizer": opt.state_dict(), "step": step, "args": vars(args),
                                          "history": history, "best": best, **extra})

    def evaluate_now():  # every rank: its share of the held-out set, the same record everywhere (held_out)
        nonlocal best
        rec, imgs, labels = held_out(ema, reference, tokenizer, reward_fn, evaluator, args, n_classes, watcher)
        rec["step"] = step
        history.append(rec)
        start_fid = history[0].get("toy_fid")
        ok = rec["drift"] <= args.max_drift and (start_fid is None or rec["toy_fid"] <= args.fid_bound * start_fid)
        if ok and (best is None or rec["heldout_reward"] > best["heldout_reward"]):
            best = dict(rec)
            save(os.path.join(args.out_dir, "checkpoint-best.pth"))
            if toy and common.is_main():
                figures.save_class_grid(imgs, labels, os.path.join(args.out_dir, "grid_best.png"))
        return rec

    # -- loop ------------------------------------------------------------------------------------------------------
    common.check_run_length(total, world)
    log = common.RunLog(args.out_dir, total, step, "rl_refine", diverged=diverged)
    control = common.StepControl(args.save_minutes)
    if step == 0 and args.eval_every:
        log.write(evaluate_now())  # the start: held-out reward (and toy FID) before any update
    while step < total:
        # the step's labels and one noise generator per image (common.step_seed, image_seed), all on the device: a
        # blocking host-to-device copy of CPU-drawn labels would make the host wait for the GPU every step
        step_seed = common.step_seed(args.seed, rank, step, world)
        label_gen = torch.Generator(device).manual_seed(common.step_seed(args.seed, rank, step, world, stream=1))
        labels = mar.randint(0, n_classes, (bsz,), label_gen, device)
        gens = [torch.Generator(device).manual_seed(common.image_seed(step_seed, b, STEP_STRIDE)) for b in range(bsz)]
        stats = rl_step(policy, reference, tokenizer, reward_fn, labels, gens, opt, args)
        step += 1
        common.update_ema(ema, policy, common.ema_decay(args.ema_rate, step, not args.no_ema_warmup))
        log.add(stats)
        save_now, stop = control.poll(step, total, args.save_every)
        if step % args.log_every == 0 or save_now:
            extra = {}
            if args.eval_every and (step % args.eval_every == 0 or step == total):
                extra = {k: v for k, v in evaluate_now().items() if k != "step"}
            log.flush(step, total=total, **extra)  # raises on a non-finite loss, before the save
        if save_now:
            save(ckpt_path)
            control.saved()
        if stop:
            break
    log.close()
    control.close()
    if control.stopped:
        control.report(step)
        common.cleanup_distributed()
        return
    common.assert_ranks_agree(policy)
    common.cleanup_distributed()  # the last collective: the main process writes alone from here
    if common.is_main() and history:
        plot_tradeoff(history, os.path.join(args.out_dir, "reward_vs_fid.png"))
        report = {"start": history[0], "best": best, "last": history[-1], "fid_bound": args.fid_bound}
        with open(os.path.join(args.out_dir, "eval.json"), "w") as f:
            json.dump(report, f, indent=2)
        print(f"start {history[0]}\nbest  {best}\nlast  {history[-1]}")


if __name__ == "__main__":
    common.cli(main)
