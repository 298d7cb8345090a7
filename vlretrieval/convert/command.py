"""`vlretrieval convert`: Hugging Face folder -> vlretrieval run folder, and back."""

from __future__ import annotations

import argparse
import logging
import os

from vlretrieval.errors import UserError
from vlretrieval.files import check_writable

log = logging.getLogger(__name__)


def add_arguments(sub: argparse.ArgumentParser, default_config: str) -> None:
    sub.add_argument("--from", dest="source", nargs=2, metavar=("FORMAT", "PATH"), required=True,
                     help="hf PATH (a Hugging Face model folder) or vlretrieval PATH (a run folder "
                     "or checkpoints/<step>)")
    sub.add_argument("--to", help="with --from hf: the vlretrieval run folder to write (new)")
    sub.add_argument("--to-hf", dest="to_hf",
                     help="with --from vlretrieval: the Hugging Face folder to write (new)")
    sub.add_argument("--arch", help="with --to-hf: bert (text tower), vit (image tower), clip, "
                     "siglip, or siglip_vision (SigLIP's image tower)")
    sub.add_argument("--config", default=default_config,
                     help="with --from hf: the experiment config the converted model goes into "
                     "(its model section is replaced), optionally FILE:ARG")
    sub.add_argument("--image_size", type=int,
                     help="with --from hf: interpolate the image position embeddings to this size")
    sub.add_argument("--max_text_length", type=int,
                     help="with --from hf: keep only this many text position embeddings")


def run_convert(args: argparse.Namespace, overrides: list[str]) -> int:
    source_format, path = args.source
    if source_format == "hf":
        if not args.to or args.to_hf or args.arch:
            raise UserError("--from hf PATH takes --to OUTDIR (not --to-hf or --arch)")
        from vlretrieval.config import load_config
        from vlretrieval.convert import architectures, hf_in, native

        config = load_config(args.config, overrides)
        if os.path.exists(args.to):  # before reading and converting the source, not after
            raise UserError(f"--to {os.path.abspath(args.to)} already exists; choose a new folder")
        check_writable(args.to, "--to", directory=True)
        base = architectures.complete_section(config.model.to_dict())
        converted = hf_in.convert_folder(
            path, base, image_size=args.image_size, max_text_length=args.max_text_length
        )
        initialised = native.write_converted(converted, args.to, config, args.config, path)
        log.info(f"converted {converted.architecture} ({len(converted.params)} parameters) from "
                 f"{path} into {args.to}")
        for note in converted.notes:
            log.info(f"note: {note}")
        if initialised:
            log.info(f"note: initialised, not converted (the source has no such weights): "
                     f"{', '.join(initialised)}")
        return 0
    if source_format == "vlretrieval":
        from vlretrieval.convert import architectures, hf_out

        if not args.to_hf or not args.arch or args.to:
            raise UserError("--from vlretrieval CKPT takes --to-hf OUTDIR and --arch "
                            f"{'|'.join(architectures.EXPORTS)}")
        if overrides or args.image_size or args.max_text_length:
            raise UserError("--from vlretrieval takes no config overrides, --image_size or "
                            "--max_text_length (the checkpoint's config is used)")
        notes = hf_out.export(path, args.to_hf, args.arch)
        log.info(f"exported {path} as {args.arch} into {args.to_hf}")
        for note in notes:
            log.info(f"note: {note}")
        return 0
    raise UserError(f"--from {source_format}: choose hf or vlretrieval")
