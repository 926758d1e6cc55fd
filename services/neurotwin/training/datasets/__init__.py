"""Recordings in: one interface (:class:`Recording`), three on-disk formats.

``load_recording(path)`` detects the format from the path and returns images as uint8 [N, H, W, 3] RGB
and responses as float32 [neurons, N]. Every problem with the data raises
:class:`neurotwin.errors.DataError` naming the file and the field, never a numpy or h5py traceback.

Formats
-------
a. **Images plus a responses .npy** (the layout of ``../shared/data/cowley_v4``).

   - ``load_recording(images.zip, responses=r.npy)`` or ``load_recording(folder, responses=r.npy)``:
     a zip or folder of image files (png, jpg, bmp, gif, tif, webp; other files are ignored) and a
     .npy of shape (neurons, images) or (neurons, images, repeats). A folder may instead hold the
     matrix as ``responses.npy``.
   - ``load_recording(root, session="201025")``: ``root`` holds ``images/images_<session>.zip`` (or a
     folder ``images/images_<session>/``) and ``responses/responses_<session>.npy``; ``session`` may be
     left out when there is only one. Neuron ids are ``<session>_<k>``.
   - Column order: when every image name contains a number and the numbers are distinct, images are
     ordered by that number (the last run of digits in the name, so ``image0007.jpg`` is 7) and column
     k of the matrix is the k-th image in that order (cowley's ``imageNNNN.jpg`` is column NNNN-1);
     otherwise images are ordered by name. Image ids are the file names without extension.
   - Grayscale, palette and RGBA image files are converted to RGB; images of different sizes are an
     error. The sha256 covers the zip (or each image file, in column order) and then the .npy.

b. **HDF5** (``.h5``, ``.hdf5``; detected by content): datasets ``images`` (N, H, W, 3) uint8 (a
   grayscale (N, H, W) or (N, H, W, 1) array is repeated to RGB) and ``responses`` (neurons, N), or
   (neurons, N, repeats) with NaN padding the repeats an image did not get. Optional ``neuron_ids``
   (neurons,) and ``image_ids`` (N,), strings or integers.

c. **NWB** (``.nwb``, or an HDF5 file whose root carries ``nwb_version``), read with pynwb:

   - Spikes: the ``units`` table's ``spike_times``; neuron ids are the unit ids.
   - Presentations, first match wins: a TimeIntervals table in ``intervals`` named ``presentations``
     (or else the only one with an ``image_index`` column) whose ``start_time`` is the onset and
     ``image_index`` the 0-based image; otherwise an ``IndexSeries`` in ``stimulus`` whose data are
     image indices and whose ``timestamps`` (or ``starting_time`` + ``rate``) are the onsets.
   - Images: the IndexSeries' ``indexed_images`` (an ``Images`` container) or ``indexed_timeseries``
     (an ``ImageSeries``) when presentations come from one; otherwise an ``Images`` container or an
     ``ImageSeries`` with in-file data in ``stimulus_template`` (or else in ``stimulus``): the one
     named ``images``, or the only one. An ``Images`` container is ordered by its ``order_of_images``
     when present (write it: HDF5 does not keep insertion order), otherwise by the rule of format a;
     image ids are the image names (ImageSeries: ``"0"``, ``"1"``, ...).
   - Counting: a spike at time t counts for a presentation with onset s when
     ``s + window[0] <= t < s + window[1]`` (seconds; default 50-150 ms). The r-th presentation (in
     time) of an image is repeat r; ``repeats`` is NaN-padded to the largest repeat count and
     ``responses`` is its nanmean. Every image must be presented at least once.

Validation (all formats): responses must be real numbers, finite, non-negative and (outside the
repeat padding) not NaN, with one column per image; every (neuron, image) needs at least one valid
repeat. ``Recording.sha256`` is the sha256 of the source bytes, the provenance a model card records.

Splits
------
:func:`split_indices` gives the train/val/test image indices that training records in the card and the
benchmark applies identically to every model.

Modules: ``recording`` (the Recording and shared constants), ``loading`` (format detection, the entry
point), ``files`` (format a), ``hdf5`` (format b), ``nwb`` (format c), ``checks`` (what every reader
checks) and ``splits``.
"""

from neurotwin.training.datasets.files import list_sessions
from neurotwin.training.datasets.loading import load_recording
from neurotwin.training.datasets.recording import (
    DEFAULT_WINDOW,
    HDF5_SUFFIXES,
    IMAGE_SUFFIXES,
    RANDOM_TEST_FRACTION,
    SPLIT_SCHEMES,
    Recording,
)
from neurotwin.training.datasets.splits import split_indices, split_summary

__all__ = [
    "DEFAULT_WINDOW",
    "HDF5_SUFFIXES",
    "IMAGE_SUFFIXES",
    "RANDOM_TEST_FRACTION",
    "SPLIT_SCHEMES",
    "Recording",
    "list_sessions",
    "load_recording",
    "split_indices",
    "split_summary",
]
