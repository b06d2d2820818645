#!/usr/bin/env python
"""HVLFormer training and evaluation script (detectron2 style).

    python projects/HVLFormer/train_net.py --config-file configs/tiny/hvlformer_tiny_shapes.yaml --num-gpus 1
    python projects/HVLFormer/train_net.py --config-file ... --eval-only MODEL.WEIGHTS out/model_final.pth
    python projects/HVLFormer/train_net.py --config-file ... --resume          # continue the last checkpoint

Multi-GPU / multi-machine runs go through detectron2's ``launch`` (NCCL on GPUs, gloo on CPU).
"""
from __future__ import annotations

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from hvlformer import build_trainer_class, setup_cfg
from hvlformer.modeling.clip_loader import clip_weights_from_checkpoint


def main(args):
    cfg = setup_cfg(args)
    default_setup(cfg, args)
    # the project's own log lines (class prompts, missing weights, ...) go to the same log file
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="hvlformer")
    trainer_class = build_trainer_class(cfg)
    if args.eval_only:
        # the CLIP weights come from MODEL.WEIGHTS: CLIP.PRETRAINED is not downloaded (offline evaluation)
        model = trainer_class.build_model(clip_weights_from_checkpoint(cfg))
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = trainer_class.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = trainer_class(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
