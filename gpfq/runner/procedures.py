"""The three scripts' procedures and every log they write.

    quantization_scripts/          PLAIN    (the paper's GPFQ)
    adhoc_quantization_scripts/    ADHOC    (bias correction, float layers, mixed precision)
    retraining_scripts/            RETRAIN  (fine-tuning between layers)
"""
from gpfq.runner.adhoc import ADHOC
from gpfq.runner.experiment import PLAIN
from gpfq.runner.retrain import RETRAIN

PROCEDURES = {"plain": PLAIN, "adhoc": ADHOC, "retrain": RETRAIN}
# {log file name: columns} of every log kind
LOG_COLUMNS = {name: columns for procedure in PROCEDURES.values() for name, columns in procedure.logs.items()}
