"""The learning rate over a run (--warmup-epochs, --schedule, --probe-epochs) and the optimizer's
parameter groups (--backbone-lr-scale)."""
import math


def learning_rate(step, total_steps, config):
    """The learning rate at a global step: linear warm-up from 0, then constant or cosine decay to 0."""
    warmup = config.warmup_epochs * total_steps / config.epochs
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.schedule == "constant":
        return config.lr
    progress = (step - warmup) / max(1.0, total_steps - warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def probing(step, total_steps, config):
    """Whether a global step lies in the first --probe-epochs, which train only what sits on the
    backbone (a linear probe before fine-tuning)."""
    return step < config.probe_epochs * total_steps / config.epochs


def set_learning_rates(optimizer, step, total_steps, config):
    """Each parameter group's learning rate at a global step: learning_rate times its lr_scale, and
    0 for the backbone while probing."""
    rate, probe = learning_rate(step, total_steps, config), probing(step, total_steps, config)
    for group in optimizer.param_groups:  # a last.pth saved before --probe-epochs has no "backbone" key
        group["lr"] = 0.0 if probe and group.get("backbone", False) else group["lr_scale"] * rate


def parameter_groups(model, backbone_lr_scale, probe=False):
    """The optimizer's parameter groups, each with the fraction of the learning rate it takes
    ("lr_scale") and whether it is the backbone: the backbone's and the rest. Scale 0 freezes the
    backbone: it is left out. A probe needs the backbone in a group of its own, whatever its scale."""
    if backbone_lr_scale == 1 and not probe:  # one group, as runs saved before the scale existed
        return [{"params": list(model.parameters()), "lr_scale": 1.0, "backbone": False}]
    backbone = list(model.backbone.parameters())
    rest = [p for name, p in model.named_parameters() if not name.startswith("backbone.")]
    if backbone_lr_scale == 0:
        for parameter in backbone:
            parameter.requires_grad_(False)
        return [{"params": rest, "lr_scale": 1.0, "backbone": False}]
    return [{"params": backbone, "lr_scale": backbone_lr_scale, "backbone": True},
            {"params": rest, "lr_scale": 1.0, "backbone": False}]
