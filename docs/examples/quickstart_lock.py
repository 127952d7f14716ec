from celery import Celery

from celery_unique import UniqueTask

app = Celery("alphabet", broker="redis://localhost:6379/0")


@app.task(base=UniqueTask, lock="/tmp/alphabet.txt")
def write_alphabet(letter):
    with open("/tmp/alphabet.txt", "a") as f:
        f.write(letter)


for letter in "abcd":
    write_alphabet.delay(letter)   # the file reads "abcd", with any number of workers
