"""Data: sources (folders, TFRecord shards, tfds, any `tf.data`, arrays) and the BYOL pipelines.

source = data.open_source("photos/")            # lists files, decodes nothing
views = data.pretrain_dataset(source, 256, config.augment)
test = data.eval_dataset(data.open_source("photos_val/"), 224, crop_fraction=0.875)
"""

from byol_tf.data.arrays import ArraySource, ExampleSet, ImageSet, load_npz
from byol_tf.data.files import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS
from byol_tf.data.eval_data import check_decodable, eval_dataset, examples_eval_dataset, load_images
from byol_tf.data.pipeline import open_source, pretrain_dataset, steps_per_epoch
from byol_tf.data.stream import StreamPosition
from byol_tf.data.shapes import SHAPE_CLASSES, make_shapes
from byol_tf.data.shards import write_shards
from byol_tf.data.record_sources import DatasetSource, ShardSource, TfdsSource
from byol_tf.data.sources import FolderSource, SkipLog, Source
