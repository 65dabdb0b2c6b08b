# prvr: Partially Relevant Video Retrieval (DL-DKD++) from raw videos to metrics.
#   snakemake --cores all                      # every dataset in config `targets`, every run
#   snakemake --cores 8 --use-conda            # per-rule conda environments (envs/)
#   snakemake --configfile config/datasets/tvr.yaml --cores 8
#   snakemake --forcerun train --until train   # rerun one stage
# Layout: rules/*.smk (one file per stage), workflow/scripts/*.py (thin adapters), prvr/ (logic).


from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


resource_scopes:
    gpu="local",


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/import.smk"
include: "rules/videos.smk"
include: "rules/text.smk"
include: "rules/teacher.smk"
include: "rules/train.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        get_final_output(),
