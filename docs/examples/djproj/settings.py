SECRET_KEY = "only-for-the-example"
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
USE_TZ = True

# Celery's settings, in the CELERY namespace; celery-unique's are CELERY_UNIQUE_*.
CELERY_BROKER_URL = "redis://localhost:6379/0"
CELERY_UNIQUE_REDIS_URL = "redis://localhost:6379/1"
CELERY_UNIQUE_QUEUEING_LOCK_TIMEOUT = 600
CELERY_UNIQUE_ON_STORE_ERROR = "raise"
