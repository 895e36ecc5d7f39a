"""Train a teacher network, or a student that learns from a frozen teacher (BlockSwap).

    python main.py cifar10 teacher --conv Conv -t wrn_40_2 --wrn_depth 40 --wrn_width 2 --cifar_loc=<path>
    python main.py cifar10 student -t wrn_40_2 -s wrn_40_2_bs800k --from_genotype genotypes/bs800k.csv --cifar_loc=<path>
    python main.py cifar10 student --moonshine --conv DConvG2 -t wrn_40_2 -s wrn_40_2.DConvG2 --cifar_loc=<path>
    python main.py folder teacher --arch resnet50 --init_weights resnet50.pth -t pets --data_loc <images>
    python main.py folder student --arch resnet50 --teacher_weights pets.pth --from_genotype g.csv -s pets_small --data_loc <images>
    torchrun --nproc_per_node 4 main.py cifar10 teacher ...    (DistributedDataParallel)

This script parses its flags into an engine.TrainConfig and calls engine.train: see engine.py
for what a run writes, how --resume and a raised --epochs behave, and the reproducibility rules.
"""
import argparse
import os

from blockswap.cli import HelpFormatter, at_least, epoch_list, positive, run_cli
from blockswap.distill import DIST_CIFAR, DISTILL_TERMS
from blockswap.engine import TrainConfig, train
from blockswap.loaders import data_args
from models import UserError, load_block_module, network_args
from blockswap.runtime import AMP_CHOICES, device_args

D = TrainConfig()   # every default is stated once, in engine.TrainConfig


def get_args_parser():
    """main.py's flags. Why long: one flag per line, every default from engine.TrainConfig."""
    p = argparse.ArgumentParser(description="BlockSwap teacher/student training",
                                formatter_class=HelpFormatter,
                                parents=[data_args(), network_args(), device_args()])
    p.add_argument("mode", choices=["teacher", "student"], help="train a teacher or a student")
    # data (the seed's folder flags; --data_loc overrides them)
    p.add_argument("--cifar_loc", default=D.data_loc, help="CIFAR folder (or ImageFolder root)")
    p.add_argument("--imagenet_loc", default="data/imagenet", help="folder with train/ and val/")
    p.add_argument("--train_subset", default=D.train_subset, type=at_least(1),
                   help="train on N fixed random images")
    p.add_argument("--val_subset", default=D.val_subset, type=at_least(1),
                   help="validate on N fixed random images")
    p.add_argument("--cutout", default=D.cutout, type=at_least(0), nargs="?", const=16,
                   help="Cutout square side in pixels (--cutout alone: 16, the paper's)")
    # checkpoints
    p.add_argument("--teacher_checkpoint", "-t", default=D.teacher_checkpoint,
                   help="teacher name: checkpoints/<name>.t7 is written (teacher) or read (student)")
    p.add_argument("--student_checkpoint", "-s", default=D.student_checkpoint,
                   help="student name: checkpoints/<name>.t7 is written")
    p.add_argument("--checkpoint_dir", default=D.checkpoint_dir)
    p.add_argument("--resume", "-r", action="store_true", help="continue from the checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start again over an existing checkpoint")
    # network (also --arch, --wrn_depth, --wrn_width, --module)
    p.add_argument("--conv", default=D.conv,
                   help="block type of a uniform network (see models/blocks.py); default: the "
                        "family's own blocks (Conv for WRN and the ResNets)")
    p.add_argument("--from_genotype", default=D.from_genotype, help="genotype CSV: one block type per block")
    p.add_argument("--moonshine", action="store_true", help="uniform student of --conv blocks")
    p.add_argument("--diff_shape", action="store_true", help="student shape from --stu_depth/width")
    p.add_argument("--stu_depth", default=D.stu_depth, type=int)
    p.add_argument("--stu_width", default=D.stu_width, type=int)
    # weights from a file (blockswap/build.py)
    p.add_argument("--init_weights", default=D.init_weights, metavar="FILE",
                   help="teacher: start from these weights (a torchvision state dict or one of "
                        "our checkpoints); a classifier for another class count starts afresh")
    p.add_argument("--teacher_weights", default=D.teacher_weights, metavar="FILE",
                   help="student: the teacher is the unmodified --arch network with these "
                        "weights (a state dict or a checkpoint), not -t's checkpoint")
    p.add_argument("--inherit", action="store_true",
                   help="student: start from the teacher's weights wherever a tensor keeps its "
                        "name and shape (default: from scratch, as in the paper)")
    # optimisation (the seed's recipe; --cosine --cutout give the ICLR paper's)
    p.add_argument("--lr", default=D.lr, type=positive())
    p.add_argument("--momentum", default=D.momentum, type=at_least(0, float))
    p.add_argument("--weight_decay", "--weightDecay", default=D.weight_decay, type=at_least(0, float))
    p.add_argument("--epochs", default=D.epochs, type=at_least(1))
    p.add_argument("--batch_size", default=D.batch_size, type=at_least(1),
                   help="global batch (all processes)")
    p.add_argument("--epoch_step", default=D.epoch_step, type=epoch_list,
                   help="JSON list: epochs to decay lr at")
    p.add_argument("--lr_decay_ratio", default=D.lr_decay_ratio, type=at_least(0, float))
    p.add_argument("--cosine", action="store_true", help="cosine annealing to 0 instead of steps")
    p.add_argument("--alpha", default=D.alpha, type=at_least(0, float),
                   help="KD weight (0: cross-entropy only; --distill kd alone takes 0.9)")
    p.add_argument("--temperature", default=D.temperature, type=positive(), help="KD temperature")
    p.add_argument("--beta", default=D.beta, type=at_least(0, float),
                   help="attention transfer weight")
    add_distill_args(p)
    p.add_argument("--seed", default=D.seed, type=int)
    p.add_argument("--subset_seed", default=D.subset_seed, type=int,
                   help="seed that picks --train_subset/--val_subset images (default: --seed); "
                        "runs compared with each other should share it")
    # hardware (also --device)
    p.add_argument("--GPU", default=None, help="sets CUDA_VISIBLE_DEVICES, e.g. '0,1'")
    p.add_argument("--amp", default=D.amp, choices=sorted(AMP_CHOICES),
                   help="autocast precision; auto: bf16 on CUDA where supported, else fp16 with "
                        "a GradScaler; bf16 on a CPU with native bf16 (AVX512-BF16 or AMX), "
                        "else off")
    p.add_argument("--no_amp", action="store_true", help="same as --amp off")
    p.add_argument("--no_channels_last", action="store_true",
                   help="NCHW memory format (channels_last is the default on CUDA and with "
                        "CPU bf16)")
    p.add_argument("--compile", action="store_true", help="torch.compile the trained network")
    p.add_argument("--print_freq", default=D.print_freq, type=at_least(1),
                   help="progress bar refresh, in steps")
    p.add_argument("--plot", default=D.plot, action=argparse.BooleanOptionalAction,
                   help="draw <name>.png (error, loss, lr curves) beside the log every epoch")
    return p


def add_distill_args(p):
    """--distill and the hyper-parameters of every term in distill.DISTILL_TERMS."""
    methods = "; ".join(f"{k}: {v.about}" for k, v in DISTILL_TERMS.items())
    p.add_argument("--distill", default=D.distill,
                   help=f"student loss: cross-entropy + these terms, joined by '+' ({methods}); "
                        "default at, or at+kd when --alpha > 0")
    for term in DISTILL_TERMS.values():
        for flag, (kind, default, about) in term.flags.items():
            p.add_argument(f"--{flag}", default=default, type=kind, help=about)
    p.add_argument("--dist_cifar", action="store_true",
                   help="DIST's CIFAR setting: " + " ".join(
                       f"--{k} {v:g}" for k, v in DIST_CIFAR.items()))


def main(args):
    if args.GPU is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.GPU   # before anything initialises CUDA
    if args.no_amp and args.amp not in ("auto", "off"):
        raise UserError(f"--no_amp and --amp {args.amp} contradict each other: give one")
    if args.module:
        load_block_module(args.module)   # its block names, before the genotype is read
    return train(TrainConfig.from_args(args))


if __name__ == "__main__":
    run_cli(main, get_args_parser())
