import random
import time

from celery_unique import UniqueTask
from proj.celery import app


@app.task(base=UniqueTask, lock="{path}")
def write_letter(path, letter):
    time.sleep(random.random() / 10)  # jobs of uneven length
    with open(path, "a") as f:
        f.write(letter)


def write_alphabet(path):
    for letter in "abcdefghijklmnopqrstuvwxyz":
        write_letter.delay(path, letter)  # the file reads a..z, however many workers
