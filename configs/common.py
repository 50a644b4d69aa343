"""The config schema every experiment starts from, with the paper's recipe as its values.

Miao et al. 2024: Stable Diffusion 2.1, ALIGN as the reward model, 8 negatives prompts × 4
images (DDIM 50, guidance 7.5), λ_train 0, Bradley-Terry labels drawn fresh, β 1, AdamW lr 5e-6
(wd 1e-2, no schedule), batch 1 pair, ≤ 400 steps, global-norm clip 1.0, validation every 40
steps with 4 images per training prompt scored at λ_val, best checkpoint kept; DreamBench's
protocol for the held-out evaluation (25 prompts × 4 images, DDIM 50, guidance 7.5, DINO / CLIP-I
/ CLIP-T).

Experiment configs (configs/toy.py, tiny.py, dreambench_sd21.py, sd15.py) call
``common.get_config()`` and override only what differs (big_vision's ``configs/common.py``
pattern); a config file can ``import common`` because the loader makes the config file's own
folder importable while it runs. Not a config to run by itself: ``pretrained``, ``reward_model``
and ``subject`` name no files here.
"""
import ml_collections


def get_config(arg=None):
    del arg  # the schema takes no arguments; experiment configs do
    c = ml_collections.ConfigDict()
    c.pretrained = ""                         # a diffusers SD folder, tiny:sd21 / tiny:sd15, toy:pipeline
    c.reward_model = ""                       # a transformers ALIGN or CLIP folder, tiny:align / tiny:clip
    c.subject = ml_collections.ConfigDict(dict(
        name="",
        class_noun="",
        live=False,                           # object prompts (True: the live-subject prompts)
        reference_dir="",                     # a folder of 3-6 photos
        identifier="[V]",
        prompts=(),                           # training prompt templates ({identifier}, {cls});
                                              # () → the paper's 8 for the subject kind
        reference_prompt="",                  # "" → "a photo of {identifier} {cls}"
    ))
    c.resolution = 0                          # 0: the pipeline's default (the paper: 512 px)
    c.dtype = "float32"                       # activation dtype: float32 | bfloat16
    c.attention_impl = "auto"                 # auto | einsum | blocked | dpa (rpo_jax/models/attention.py)
    c.mesh = (-1, 1, 1)                       # (data, fsdp, tensor); -1 fills with the devices left,
                                              # e.g. (1, -1, 1) for FSDP
    c.logical_axis_rules = ()                 # ((logical, mesh axes), ...) before the defaults in
                                              # rpo_jax/core/partitioning.py, e.g. (("heads", "fsdp"),)
    c.negatives = ml_collections.ConfigDict(dict(
        k=4,                                  # images per training prompt (paper: 4; authors' code: 16)
        seed=0,
        num_inference_steps=50,               # paper: DDIM 50
        guidance_scale=7.5,
        negative_prompt="",
        batch_size=8,                         # images per sampling call, for negatives, validation
                                              # and held-out evaluation alike
        refresh_every=0,                      # online RPO: every k steps re-sample the negatives
                                              # from the current UNet and re-score them; 0: off (paper)
    ))
    c.reward = ml_collections.ConfigDict(dict(
        lambda_train=0.0,                     # λ for preference labels (paper: 0)
        lambda_val=0.5,                       # λ for model selection (paper: 0.3 / 0.5 / 0.7)
    ))
    c.labels = ml_collections.ConfigDict(dict(mode="sampled"))  # sampled | soft
    c.objective = ml_collections.ConfigDict(dict(
        beta=1.0,                             # applied to Δ (paper README: 1.0)
        w_sim=1.0,                            # L = w_sim·L_sim + w_pref·L_pref
        w_pref=1.0,
        share_noise_in_pair=False,            # True: Diffusion-DPO style shared t and ε per pair
        mode="rpo",                           # rpo | dreambooth: L = w_sim·L_sim + prior_weight·L_prior
                                              # on class images (prior preservation, no negatives)
        prior_weight=1.0,                     # λ_prior of mode=dreambooth (DreamBooth: 1)
    ))
    c.prior = ml_collections.ConfigDict(dict(  # mode=dreambooth: class images of the frozen base model
        num_images=200,                       # N (diffusers' DreamBooth script: 200; paper's DreamBooth ~1000)
        prompt="a photo of a {cls}",          # class prompt template ({cls}: subject.class_noun)
        seed=0,                               # fixed noise; sampled with the negatives.* settings
    ))
    c.train = ml_collections.ConfigDict(dict(
        max_steps=400,                        # paper: ≤ 400
        batch_size=1,                         # pairs per micro-batch (paper: 1)
        grad_accum=1,                         # micro-batches per optimizer step
        micro_batch_loop="auto",              # grad_accum > 1: 'unroll' | 'scan' | 'auto' (CPU: unroll)
        lr=5e-6,
        weight_decay=1e-2, b1=0.9, b2=0.999, eps=1e-8,
        warmup_steps=0,
        max_grad_norm=1.0,                    # global-norm clip, applied (0 turns it off)
        seed=0,
        remat=False,
        ref_params_dtype="float32",           # frozen reference UNet: float32 | bfloat16
        term_grad_norms=True,                 # log |∇L_sim| and |∇L_pref| (one extra backward pass)
        on_nonfinite="stop",                  # NaN/inf loss or gradient: 'stop' (error naming the step
                                              # and term; nothing non-finite is saved) | 'skip_step'
                                              # (keep params and optimizer state, go on)
        checkpoint_every=40,
        log_every=1,
    ))
    c.lora = ml_collections.ConfigDict(dict(  # LoRA fine-tuning instead of the whole UNet
        enabled=False,                        # paper: False (the full UNet trains)
        rank=4,                               # r
        alpha=4.0,                            # α; the adapters' scale is α / r
        targets=("to_q", "to_k", "to_v", "to_out.0"),  # PEFT target_modules names, or one preset:
                                              # ("attn",) these four, ("attn_ff",) + feed-forward,
                                              # ("attn_ff_conv",) + ResNet convs
        dropout=0.0,                          # PEFT's lora_dropout (adapter input, training only)
    ))                                        # the frozen base (= the reference) is stored in
                                              # train.ref_params_dtype; adapters are float32
    c.eval = ml_collections.ConfigDict(dict(
        every=40,                             # paper: 40
        num_images=4,                         # per training prompt (paper: 4)
        num_inference_steps=50,               # paper: DDIM 50
        guidance_scale=7.5,
        seed=1234,                            # fixed validation noise
        early_stop_patience=0,                # evaluations without improvement before stopping; 0: off
        lambda_sweep=(),                      # also keep the best UNet by r_λ for each λ here
                                              # (best_lambda/<λ>/; `rpo-jax eval --lambda λ`), e.g.
                                              # (0.3, 0.7): the paper's λ_val ablation from one run
    ))
    c.test = ml_collections.ConfigDict(dict(  # held-out evaluation (rpo-jax eval; DreamBench)
        prompts=(),                           # templates; () → DreamBench's 25 for the subject kind
        num_images=4,                         # per prompt (DreamBench: 4); 0: `rpo-jax train` skips
                                              # the held-out evaluation (set it for `rpo-jax eval`)
        num_inference_steps=50,               # DreamBench protocol: DDIM 50
        guidance_scale=7.5,
        seed=2024,
        clip_model="",                        # CLIP folder for CLIP-I / CLIP-T ("" skips them)
        dino_model="",                        # DINO ViT folder for DINO ("" skips it)
        oracle="",                            # toy world only: the oracle judges' folder
    ))
    return c
