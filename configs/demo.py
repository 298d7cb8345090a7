"""The demo: a decomposed (VLDeformer) transformer trained on the bundled demo scenes.

Sized to train and evaluate on a 2-core laptop CPU in about a quarter of an hour.
  vlretrieval demo --config configs/demo.py
  vlretrieval train --config configs/demo.py:tiny --workdir /tmp/smoke   # a seconds-long smoke run
"""

import ml_collections


def transformer(width: int, depth: int, heads: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            width=width,
            depth=depth,
            num_heads=heads,
            mlp_dim=4 * width,
            dropout=0.0,
            attention_dropout=0.0,
            pre_norm=True,
            final_norm=True,
            layer_norm_eps=1e-6,
            activation="gelu",
            # What each block keeps for the backward pass: "none", "full" (recompute the block)
            # or a jax.checkpoint_policies name such as "dots_saveable".
            remat="none",
            causal=False,  # CLIP's text tower attends to earlier tokens only
        )
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "demo_scenes"
    config.data.data_dir = "data"  # where the demo set is generated on first use
    config.data.dataset_dir = ""  # or: an already prepared tfds dataset directory
    config.data.tokenizer = ""  # empty: the tokenizer trained beside the demo data
    config.data.languages = ("en", "de", "fr", "es")
    config.data.max_text_length = 32
    # Sizes of the generated demo set (the default tfds config is 20,000 / 1,000 / 1,000).
    config.data.num_train = 20_000
    config.data.num_validation = 1_000
    config.data.num_test = 1_000
    # Published benchmark layouts (config.data.name = karpathy | crossmodal3600 | xtd10 |
    # multi30k | jsonl): their files as published, read once into config.data.data_dir.
    config.data.manual_dir = ""
    config.data.images_dir = ""  # empty: the layout's own place under manual_dir
    config.data.annotation = ""  # karpathy: dataset_coco.json etc. (empty: the only one there)
    config.data.restval_to_train = True  # karpathy: fold the restval split into train
    config.data.caption_language = "en"  # jsonl: the language of a plain "caption" field
    config.data.on_bad_record = "skip"  # or "fail": a missing/corrupt image or empty caption
    # A layout's own options, "NAME=VALUE,...": pascal_sentence test_per_category /
    # validation_per_category, cub class_split, abo language_tag_prefix / test_fraction (docs/datasets.md).
    config.data.layout_options = ""
    # Web-scale training shards (config.data.name = webdataset): img2dataset's webdataset tars,
    # streamed per host (vlretrieval/data/streaming.py); evaluation on a prepared dataset.
    config.data.shards = ""  # a brace pattern (/data/cc3m/{00000..00331}.tar), a glob, or a list file
    # Captions from KEY.json fields per language, "en=caption,de=caption_de"; empty: KEY.txt, in
    # caption_language.
    config.data.caption_fields = ""
    config.data.shuffle_buffer = 10_000  # samples per shuffled window
    config.data.shard_readers = 4  # shards read at once per host
    config.data.workers = 0  # decode/crop threads per host (0: one per core)
    config.data.eval_dataset_dir = ""  # the prepared dataset a webdataset run evaluates on
    # Training images: a random crop of this area fraction, resized to model.image_size.
    config.data.crop_scale = (0.5, 1.0)
    # Detector-region datasets (config.data.name = demo_regions | precomputed_regions |
    # region_files, docs/regions.md): regions kept per image (the first, by the detector's order;
    # fewer are padded) and each region's feature width (SCAN/TERAN's release: 36 and 2048).
    config.data.num_regions = 6
    config.data.region_feature_dim = 64
    config.data.captions_per_image = 5  # precomputed_regions: caption lines per image in {split}_caps.txt
    # Category labels (label mAP, label-supervised objectives; vlretrieval/data/labels.py): empty, a
    # labelled dataset's own; on the demo scenes dominant_shape | dominant_colour (one a scene) or
    # shapes | colours (every one in the scene).
    config.data.labels = ""
    # Only some records of a split (vlretrieval/data/subsets.py): a JSON file {split: [record
    # positions]}; the splits it names are read as those records, by training and evaluation alike.
    # `vlretrieval continual` writes one per task. Empty: every record.
    config.data.subset = ""

    config.model = ml_collections.ConfigDict()
    config.model.kind = "decomposed"  # or "dual"
    config.model.image_size = 64
    config.model.patch_size = 16
    config.model.max_text_length = config.data.get_ref("max_text_length")
    # Compute dtype of matmuls and activations ("bfloat16" on accelerators); parameters, optimizer
    # state, norms, softmax, logits and losses stay float32.
    config.model.dtype = "float32"
    # "auto": cuDNN's fused flash attention on a GPU in bfloat16, the explicit einsum form on the
    # CPU (faster there), else jax.nn.dot_product_attention's "xla" path; or name one of "xla",
    # "cudnn", "explicit".
    config.model.attention = "auto"
    # One nn.scan over stacked block parameters: compile time independent of depth. Checkpoints
    # and converted weights load into either layout.
    config.model.scan_layers = False
    config.model.transformer = transformer(width=128, depth=4, heads=4)
    # Used when kind == "dual": an independent ViT and text transformer.
    config.model.image_transformer = transformer(width=128, depth=4, heads=4)
    config.model.text_transformer = transformer(width=128, depth=4, heads=4)
    config.model.head = ml_collections.ConfigDict(
        dict(
            embed_dim=128,
            # text: cls | mean | last (last real token, CLIP) | last_position (SigLIP);
            # image: cls | mean | last | map (SigLIP's attention-pooling head)
            text_pooling="mean",
            image_pooling="cls",
            initial_temperature=0.07,
            max_logit_scale=100.0,
            clip_logit_scale=True,  # False: the scale is not clipped (SigLIP's exceed 100)
            # A learnable bias added to the logits: needed by objectives.contrastive_loss=sigmoid
            # (SigLIP initialises temperature 0.1 and bias -10).
            logit_bias=False,
            initial_logit_bias=-10.0,
            # A dense + tanh on the pooled token (BERT's / ViT's pooler), for converted models.
            text_pooler=False,
            image_pooler=False,
            # False: the pooled image output is the embedding (SigLIP; embed_dim = image width).
            image_projection=True,
            text_projection_bias=False,  # SigLIP's text head has a bias
            # A hashing head: per tower a linear layer from the embedding to this many bits (0:
            # none; else a multiple of 8: 16, 32, 64, 128), trained through tanh with the
            # objectives' hash_* terms, read by sign into packed codes (docs/hashing.md).
            hash_bits=0,
            # A topic head (TextTopicNet, docs/topics.md): a linear layer from the pooled image
            # output to this many LDA topics (0: none), trained by objectives.topic_prediction;
            # also the number of topics of the LDA fitted on the training texts (config.topics).
            num_topics=0,
        )
    )
    # Embedding details of converted Hugging Face models (kind == "dual"): BERT has token-type
    # embeddings and a LayerNorm on them; CLIP has neither, and no bias on its patch projection
    # but a LayerNorm before the image encoder; SigLIP's image tower has no class token.
    config.model.text_embeddings = ml_collections.ConfigDict(
        dict(type_vocab_size=2, layer_norm=True, layer_norm_eps=1e-12)
    )
    # "patches" (pixels), or "regions": detector-region features with box geometry in place of
    # pixels (docs/regions.md), from the region datasets (demo_regions, precomputed_regions,
    # region_files); classes: the region labels masked object classification predicts (0: none).
    config.model.image_input = "patches"
    config.model.regions = ml_collections.ConfigDict()
    config.model.regions.feature_dim = config.data.get_ref("region_feature_dim")
    config.model.regions.num_regions = config.data.get_ref("num_regions")
    config.model.regions.classes = 0
    config.model.image_embeddings = ml_collections.ConfigDict(
        dict(patch_bias=True, layer_norm=False, layer_norm_eps=1e-5, class_token=True)
    )

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 128  # global, over all devices and hosts
    # 1,000 steps, not 500: at 500 recall is still climbing steeply and float rounding alone (1 vs
    # 8 devices, or accumulation on) moved the end point by up to 15 points of R@1; at 1,000 every
    # seed ends near the same recall (docs/multi-device.md).
    config.train.num_steps = 1000
    config.train.log_every = 25
    config.train.checkpoint_every = 250
    config.train.num_devices = 0  # 0: every device of every host
    # Shard parameters and optimizer state over the devices (FSDP) instead of replicating them.
    config.train.fsdp = False
    # Micro-batches per step: embeddings of the whole batch are cached, then each micro-batch is
    # recomputed with gradients against them, so the negatives are still the whole batch.
    config.train.accumulation_steps = 1
    # Start a new run from another run's parameters: a workdir, or one of its checkpoints/<step>.
    config.train.init_from = ""
    # Checkpoints: the last keep_last, plus the keep_best best by eval_<best_metric> when
    # eval_every > 0 (an evaluation on config.eval.split every that many steps; 0 = at the end).
    config.train.keep_last = 3
    config.train.keep_best = 1
    config.train.best_metric = "mean_recall"
    config.train.eval_every = 0
    # Check for SIGTERM (pre-emption) every this many steps: on several hosts the check is a
    # collective, so not every step. The run saves and stops at the next multiple.
    config.train.preemption_check_every = 10
    # The chip's dense peak TFLOP/s for MFU in the logs (0: looked up for known GPUs and TPUs).
    config.train.peak_tflops = 0.0
    # A softmax-contrastive run whose loss sits at ln(batch) with ~0 gradient norm for several
    # logged steps has collapsed (vlretrieval/collapse.py): a warning, or with this an error.
    config.train.stop_on_collapse = False
    # Write batches.process_<i>.jsonl: each step's sample keys (record indices, or webdataset keys)
    # and a hash of its pixels, per host: which data a step trained on, for audits and bisection.
    config.train.record_batches = False

    # Each term's weight (0 = off) and its settings; the terms: vlretrieval/objectives/terms.py.
    config.objectives = ml_collections.ConfigDict(
        dict(
            contrastive=1.0,
            contrastive_loss="softmax",  # or "sigmoid" (SigLIP; needs model.head.logit_bias)
            reweighted_contrastive=0.0,
            reweight_beta=1.0,
            hardest_negative_hinge=0.0,
            hinge_margin=0.2,
            hinge_top_k=1,  # hinge against the k hardest negatives of the global batch (VSE++: 1)
            image_text_matching=0.0,
            itm_sampling_temperature=0.0,  # 0: the learned temperature; else a fixed one
            masked_language_model=0.0,
            mlm_probability=0.15,
            # Composed bimodal hard negatives: every example's composed negative is an extra
            # column for every row of the global batch (NegCLIP-style).
            composed_text_negatives=False,
            text_swap_fraction=0.3,
            composed_image_negatives=False,
            image_mix_fraction=0.5,
            # MURAL's text-text task on translation pairs (config.bitext), through the same text
            # tower: w_tt x symmetric InfoNCE over the global batch of pairs.
            text_text=0.0,
            text_text_temperature=0.0,  # 0: the model's learned temperature; else a fixed one
            text_text_margin=0.0,  # LaBSE's additive margin on the positive pair's cosine
            # TERAN: the hinge (hinge_margin, hinge_top_k) over word x region late-interaction
            # scores: max_mean (each word's best region, averaged), max_sum or symmetric.
            late_interaction_hinge=0.0,
            late_interaction_aggregation="max_mean",
            # Masked region modelling (model.image_input=regions, the joint model): this fraction
            # of real regions hidden; regress their features (MRFR) / classify their labels (MOC).
            masked_region_features=0.0,
            masked_region_classes=0.0,
            region_mask_probability=0.15,
            # Distillation from config.distill.teacher (docs/hashing.md): KL(teacher || student)
            # between the row softmaxes, at this temperature, of the similarity matrices over the
            # global batch, each matrix weighted by its similarity_* weight below.
            distillation=0.0,
            distillation_temperature=0.05,
            # The matrices the teacher terms (distillation, hash_similarity) compare: image x
            # text, image x image, text x text (0 leaves one out; a single-tower teacher has only
            # its own modality's).
            similarity_image_text=1.0,
            similarity_image_image=1.0,
            similarity_text_text=1.0,
            # Hashing (model.head.hash_bits > 0): mean (1 - |tanh(h)|)^2 pushes the relaxed bits
            # to +-1; hash_similarity matches the codes' similarity b.b'/K to the teacher's cosine
            # (no teacher: the student's own), squared error; with distill.joint_teaching the
            # targets move towards the two students' agreed similarity by this fraction at most.
            hash_quantization=0.0,
            hash_similarity=0.0,
            joint_teaching_refinement=0.5,
            # hash_distillation: the distillation KL above (same temperature and matrices) with
            # the relaxed codes tanh(h)/|tanh(h)| as the student's embeddings: the codes learn the
            # teacher's ranking structure, not its raw cosines (no teacher: the student's own).
            hash_distillation=0.0,
            # hash_distillation scores sign(h) itself (tanh's gradient passes straight through).
            hash_straight_through=False,
            # TextTopicNet (model.head.num_topics > 0, docs/topics.md): soft cross-entropy between
            # the image's predicted topic distribution and the LDA's distribution of its texts.
            topic_prediction=0.0,
            # IDCMR's label-supervised terms (need category labels: config.data.labels on the demo;
            # docs/labels.md): the pairwise NLL of "shares a category" under sigmoid(scale x cosine)
            # within each tower / across the towers (DSCMR's scale is 0.5, which on the demo lowered
            # label mAP), the latter plus this weight x mean ||u_i - v_i||^2 of each pair's embeddings.
            label_intra_modal=0.0,
            label_inter_modal=0.0,
            label_similarity_scale=5.0,
            modality_invariance=1.0,
        )
    )

    # The LDA topic model of objectives.topic_prediction and eval.mode=topics (vlretrieval/topics.py),
    # fitted once per run on each training image's captions joined, saved in <workdir>/topics/;
    # model.head.num_topics topics, random_state = seed. Vocabulary: words in at least min_df
    # documents and at most a max_df fraction of them (gensim's filter_extremes keeps no_above=0.5),
    # the max_features most frequent (0: all), without stop_words ("english" or "": none).
    config.topics = ml_collections.ConfigDict(
        dict(max_iter=10, min_df=2, max_df=0.5, max_features=0, stop_words="english",
             doc_topic_prior=0.0, topic_word_prior=0.0)  # LDA priors alpha, eta; 0: 1 / num_topics
    )

    # A frozen teacher whose similarity structure the student learns (objectives.distillation,
    # objectives.hash_similarity; docs/hashing.md).
    config.distill = ml_collections.ConfigDict()
    # One of our run folders or its checkpoints/<step>, or a folder written by `vlretrieval
    # convert` (CLIP, SigLIP, ViLT; a single BERT/ViT/sentence-transformers tower gives its own
    # modality's matrix only). Empty: no teacher. Its weights are loaded into params["teacher"]
    # and frozen; it must read the student's tokens (the same tokenizer) and images.
    config.distill.teacher = ""
    # JOG's joint teaching: a peer student of config.model's architecture trained beside the
    # student on the same hashing terms; where the two agree, their code similarity refines the
    # teacher's targets (objectives.joint_teaching_refinement). Needs a teacher and hash_bits.
    config.distill.joint_teaching = False

    # Translation pairs for the text-text task (used when objectives.text_text > 0).
    config.bitext = ml_collections.ConfigDict()
    config.bitext.batch_size = 128  # global sentence pairs per step, beside the image-text batch
    # A directory of <source>-<target>.tsv files (built once into data.data_dir), or a prepared
    # TranslationPairs dataset; both empty: the demo's pairs (English with every other language).
    config.bitext.tsv_dir = ""
    config.bitext.dataset_dir = ""
    config.bitext.language_pairs = ()  # e.g. ("en-de", "en-it"); empty = every pair there is
    config.bitext.pair_weights = ()  # sampling proportions of language_pairs; empty = equal

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 50
    config.optimizer.end_learning_rate_fraction = 0.02
    config.optimizer.weight_decay = 0.05
    config.optimizer.b2 = 0.98
    config.optimizer.gradient_clip_norm = 1.0
    # Fine-tuning pretrained towers: regular expressions over parameter paths ("/"-joined, matched
    # whole, e.g. "text_transformer/.*"). Frozen parameters are not updated at all; lr_mults pairs
    # (pattern, multiplier) scale the learning rate of what they match (first match wins).
    config.optimizer.freeze = ()
    config.optimizer.lr_mults = ()

    # The continual protocol (`vlretrieval continual --tasks FILE`, docs/continual.md): a sequence of
    # tasks, each task after the first starting from the previous one's parameters. The mitigation
    # of forgetting: finetune (none), frozen_image_tower (after task 1 every parameter the image
    # embedding reads is frozen, so saved galleries stay valid) or lwf (learning without
    # forgetting: objectives.distillation from the previous task's model, at distillation_weight).
    config.continual = ml_collections.ConfigDict()
    config.continual.mitigation = "finetune"
    config.continual.distillation_weight = 1.0

    config.eval = ml_collections.ConfigDict()
    config.eval.split = "test"
    config.eval.batch_size = 500
    config.eval.recall_at = (1, 5, 10)
    # or "joint" (ITM score of every pair), "rerank" (the joint model re-orders the towers'
    # shortlist), "late_interaction" (TERAN: every pair by word x region late interaction) or
    # "late_interaction_rerank" (late interaction re-orders the towers' shortlist) or "topics"
    # (TextTopicNet's topic space: predicted topics of the images x the run's LDA topics of the
    # captions, by the Bhattacharyya coefficient; docs/topics.md)
    config.eval.mode = "towers"
    config.eval.late_interaction_aggregation = "max_mean"  # or max_sum | symmetric
    config.eval.shortlist = 20  # candidates per query that rerank re-orders
    # Rerank by joint log-odds + this x tower cosine (0: the joint score alone).
    config.eval.rerank_tower_weight = 0.0
    config.eval.pair_batch_size = 256  # (text, image) pairs per joint pass
    # The checkpoint whose joint model scores pairs in joint/rerank modes (a workdir or
    # checkpoints/<step>); empty = the evaluated checkpoint itself.
    config.eval.joint_from = ""
    config.eval.max_images = 0  # evaluate on the first N images only (0 = all): joint mode is O(N^2)
    # eval / index / search: the checkpoint step to use (0 = the latest). A latest checkpoint that
    # cannot be read is an error unless `fallback` (then the newest readable one, with a warning).
    config.eval.step = 0
    config.eval.fallback = False
    # Metrics reported in towers mode (vlretrieval/metrics.py): recall, rank, mean_recall,
    # paired_recall, map, map_at_r, hamming, ndcg (graded by ROUGE-L between captions: TERAN's
    # protocol, evaluation/relevance.py) at each K of ndcg_at.
    config.eval.metrics = ("recall", "rank", "mean_recall")
    config.eval.ndcg_at = (25,)
    config.eval.ties = "index"  # ties with negatives: index | pessimistic | optimistic | expected (docs/search.md)
    # Exact top-k / ranks by blocks on the device: memory O(query_chunk x gallery_chunk).
    config.eval.query_chunk = 1024
    config.eval.gallery_chunk = 16384
    config.eval.score_dtype = "float32"  # or "bfloat16" (float32 sums either way)
    # A saved image index (`vlretrieval index`) to rank against instead of embedding the images.
    config.eval.index = ""
    # Also write results.md and PNG plots (recall@K curves, per-language bars) beside results.json.
    config.eval.report = True

    if arg == "tiny":  # a smoke run: tiny data, tiny model, a few steps
        config.data.num_train, config.data.num_validation, config.data.num_test = 256, 32, 64
        config.model.transformer = transformer(width=32, depth=1, heads=2)
        config.model.image_transformer = transformer(width=32, depth=1, heads=2)
        config.model.text_transformer = transformer(width=32, depth=1, heads=2)
        config.model.head.embed_dim = 32
        config.train.batch_size = 32
        config.train.num_steps = 6
        config.train.log_every = 2
        config.train.checkpoint_every = 3
        config.optimizer.warmup_steps = 2
        config.eval.batch_size = 32
    elif arg is not None:
        raise ValueError(f"unknown demo config argument {arg!r}; use 'tiny' or nothing")
    return config
