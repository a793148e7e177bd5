"""A flat-layout COCO-format dataset with non-contiguous named categories (ids 3, 7, 12), made from the synthetic
shapes: train.json, val.json and one folder of images, as a user's own data comes.

    python tests/own_data.py mydata --num_train 64 --num_val 32 --seed 1     # the README's "Your own data"
"""
import argparse
import json
import os
import shutil

from detr_irpe_datasets.synthetic import ensure_synthetic_coco

IDS = {1: 3, 2: 7, 3: 12}  # synthetic id -> ours
NAMES = {3: 'circle', 7: 'square', 12: 'triangle'}


def make_flat_dataset(folder, num_train=8, num_val=4, image_size=64, seed=0):
    """folder/{train.json, val.json, images/} with categories 3, 7, 12; returns the four data flags."""
    synthetic = ensure_synthetic_coco(os.path.join(folder, 'synthetic'), num_train=num_train, num_val=num_val,
                                      image_size=image_size, num_classes=3, objects=(1, 2), object_size=(0.3, 0.5),
                                      seed=seed)
    images = os.path.join(folder, 'images')
    os.makedirs(images, exist_ok=True)
    for split in ('train', 'val'):
        with open(os.path.join(synthetic, 'annotations', f'instances_{split}2017.json')) as f:
            data = json.load(f)
        for image in data['images']:  # one folder for both splits: their file names must differ
            name = f"{split}_{image['file_name']}"
            shutil.copy(os.path.join(synthetic, f'{split}2017', image['file_name']), os.path.join(images, name))
            image['file_name'] = name
        data['categories'] = [{'id': i, 'name': n, 'supercategory': 'shape'} for i, n in NAMES.items()]
        for ann in data['annotations']:
            ann['category_id'] = IDS[ann['category_id']]
        with open(os.path.join(folder, f'{split}.json'), 'w') as f:
            json.dump(data, f)
    shutil.rmtree(synthetic)
    os.remove(os.path.join(folder, 'synthetic.lock'))
    return ['--train_json', os.path.join(folder, 'train.json'), '--train_images', images,
            '--val_json', os.path.join(folder, 'val.json'), '--val_images', images]


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('folder')
    parser.add_argument('--num_train', type=int, default=64)
    parser.add_argument('--num_val', type=int, default=32)
    parser.add_argument('--seed', type=int, default=1, help='the drawing (the synthetic presets draw with 0)')
    args = parser.parse_args()
    print(' '.join(make_flat_dataset(args.folder, args.num_train, args.num_val, seed=args.seed)))
