/**
 * The names of a disk image output, in one place: the image `X.img` (or `X.img.zst` when
 * compressed) and its bmap `X.img.bmap` beside it, named after the uncompressed image (bmaptool
 * reads a `.zst` with the uncompressed image's bmap).
 */
export interface ImageFiles {
  /** The uncompressed image's name (`X.img`): what messages name while it is laid. */
  raw: string;
  /** What is written: `X.img`, or `X.img.zst` when compressed. */
  file: string;
  /** Its bmap: `X.img.bmap`. */
  bmap: string;
}

/** The files of an image whose uncompressed name is `raw`. */
export function imageFiles(raw: string, compress?: "zstd"): ImageFiles {
  return { raw, file: compress === "zstd" ? `${raw}.zst` : raw, bmap: `${raw}.bmap` };
}

/** The files of an image written as `file` (`X.img` or `X.img.zst`). */
export function imageFilesOf(file: string): ImageFiles {
  const zst = file.endsWith(".zst");
  return imageFiles(zst ? file.slice(0, -".zst".length) : file, zst ? "zstd" : undefined);
}
