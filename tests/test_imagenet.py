"""The ImageNet path end to end at toy size: ResNet-34 teacher, a BlockSwap ResNet-34 student
from the paper's genotype, and a ResNet-34 search (images are resized to 224 by the loader)."""
import os

import torch

import fisher_rank
import main as trainer
from blockswap.count_ops import count_params
from blockswap.funcs import load_genotype

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resnet34_teacher_student_and_search(tmp_path, tiny_imagefolder):
    common = ["--imagenet_loc", tiny_imagefolder, "--checkpoint_dir", str(tmp_path),
              "--epochs", "1", "--batch_size", "4", "--train_subset", "4", "--val_subset", "4",
              "--workers", "0", "--device", "cpu", "--no-plot"]
    trainer.main(trainer.get_args_parser().parse_args(["imagenet", "teacher", "-t", "r34",
                                                       *common]))
    teacher = torch.load(tmp_path / "r34.t7", weights_only=True)
    assert teacher["arch"] == "resnet34" and teacher["num_classes"] == 10
    geno = os.path.join(ROOT, "genotypes", "bs_imagenet_1.csv")
    out = trainer.main(trainer.get_args_parser().parse_args(
        ["imagenet", "student", "-t", "r34", "-s", "r34_bs", "--from_genotype", geno, *common]))
    student = out.model
    assert student.genotype == load_genotype(geno)
    # the paper's ~3.1M student, less the 1000-class head swapped for this 10-class folder
    assert count_params(student) == 3_080_488 - 513 * 990

    args = fisher_rank.get_args_parser().parse_args(
        ["imagenet", "--data_loc", tiny_imagefolder, "--param_goal", "3000000", "--samples", "2",
         "--batch_size", "4", "--results_dir", str(tmp_path / "r"),
         "--genotype_dir", str(tmp_path / "g"), "--save_file", "none",
         "--no-plot"])
    summary = fisher_rank.main(args)
    assert len(summary["best_genotype"]) == 16
    assert abs(summary["params"] - 3_000_000) <= 75_000
