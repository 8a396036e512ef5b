/* CPU kernels (built by tadfkd.models.kernels), one thread each: for no-grad forwards, for some
 * forwards with their backwards, and for the selection.
 *
 * The DAFL generator's bf16 forward (tadfkd.models.fused): each BatchNorm-LeakyReLU pair, with
 * the nearest 2x upsampling that follows it or the one-output-channel convolution that follows
 * the last one, in one pass over memory instead of three to five. Tensors are bf16 in the
 * (n, h, w, c) index order with element strides (channels-last when the channel stride is 1);
 * affine arithmetic, the activation and the last convolution in float32, rounded once to bf16
 * where a bf16 tensor is written.
 *
 * With the generator's upsampled convolutions computed by phase (tadfkd.models.upsampling): the
 * BatchNorm-LeakyReLU pair without the upsampling, and the phases' outputs put in place (and
 * their gradients back, in the generator step).
 *
 * A grayscale network's first convolution, one input channel (tadfkd.models.single_channel):
 * float32 or bf16 in and out, float32 sums; with the ReLU after it or without.
 *
 * The generator's last convolution (one output channel) where gradients flow
 * (tadfkd.models.output_conv): the forward is the fused kernel's with the identity map, the
 * backward's three gradients one kernel.
 *
 * A frozen network's float32 3x3 convolutions (tadfkd.models.winograd) by Winograd's F(4x4, 3x3)
 * or F(2x2, 3x3), with the ReLU and the pooling after each in the pass that writes its output.
 *
 * A ReLU and the pooling after it (tadfkd.models.pooling), BatchNorm in training
 * (tadfkd.models.batchnorm), forward and backward, and the selection's two-Gaussian mixture fit
 * (tadfkd.distillation.selection).
 *
 * Compiled on the machine that runs it (-march=native).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_CHANNELS 1024
#define MAX_CONV_ONE_CHANNELS 64 /* the one-output-channel convolution's kernels */
/* what the entry points return: done, an input they do not take, no memory */
#define DONE 0
#define REFUSED -1
#define NO_MEMORY -2

/* run the always-inlined `kernel` with the channel count a compile-time constant for 16, 32
 * and 64 channels in unit stride (so the channel loops become whole vectors), generically
 * otherwise */
#define BY_CHANNELS(kernel, C, sc, ...)                                 \
    do {                                                                \
        if ((sc) == 1 && (C) == 16)                                     \
            kernel(16, 1, __VA_ARGS__);                                 \
        else if ((sc) == 1 && (C) == 32)                                \
            kernel(32, 1, __VA_ARGS__);                                 \
        else if ((sc) == 1 && (C) == 64)                                \
            kernel(64, 1, __VA_ARGS__);                                 \
        else                                                            \
            kernel(C, sc, __VA_ARGS__);                                 \
    } while (0)

static inline float bf16_to_float(uint16_t v) {
    uint32_t u = ((uint32_t)v) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* round to nearest even, as torch does; a NaN stays a (quiet) NaN */
static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* 16 floats, in one AVX-512 register or two AVX ones: GCC's and Clang's vector extension */
typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

static inline f32x16 load16(const float *p) {
    f32x16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline f32x16 load16_bf16(const uint16_t *p) {
    u16x16 half;
    memcpy(&half, p, sizeof half);
    u32x16 bits = __builtin_convertvector(half, u32x16) << 16;
    f32x16 v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

static inline float leaky_relu(float v, float slope) { return v > 0.0f ? v : v * slope; }

/* Where pixel (n, h, w) of x is, split into its row's offset and its column's: at element
 * strides (phase_block 0), or in a phases tensor (N, 4 C, H / 2 + 1, W / 2 + 1) with unit
 * channel stride (phase_block C; tadfkd.models.upsampling): pixel (2i + a, 2j + b) of the
 * upsampled convolution is phase (a, b)'s pixel (i + a, j + b), channels (2a + b) C on, so
 * the kernels read it without the phases being put in place first. */
static inline int64_t row_offset(int64_t n, int64_t h, int64_t sn, int64_t sh,
                                 int64_t phase_block) {
    if (phase_block == 0) return n * sn + h * sh;
    return n * sn + ((h + 1) >> 1) * sh + 2 * (h & 1) * phase_block;
}

static inline int64_t column_offset(int64_t w, int64_t sw, int64_t phase_block) {
    if (phase_block == 0) return w * sw;
    return ((w + 1) >> 1) * sw + (w & 1) * phase_block;
}

/* Per-channel sums of x - x[0,0,0,c] and of its squares: float within a row of the image,
 * double across rows; the shift keeps E[x^2] - E[x]^2 exact enough when the mean is large
 * beside the spread. Channels in unit stride run 16 to a vector: GCC left the loop over 32
 * channels scalar, ten times slower a pixel than over 16 (the same sums either way). */
static inline __attribute__((always_inline)) void shifted_sums(
    const int64_t C, const int64_t sc, const uint16_t *x, int64_t N, int64_t H, int64_t W,
    int64_t sn, int64_t sh, int64_t sw, int64_t phase_block, float *shift, double *sum,
    double *sumsq) {
    for (int64_t c = 0; c < C; c++) {
        shift[c] = bf16_to_float(x[c * sc]);
        sum[c] = 0.0;
        sumsq[c] = 0.0;
    }
    if (sc == 1 && C % 16 == 0) {
        enum { MAX_GROUPS = MAX_CHANNELS / 16 };
        const int64_t groups = C / 16;
        f32x16 first[MAX_GROUPS], part[MAX_GROUPS], part2[MAX_GROUPS];
        for (int64_t g = 0; g < groups; g++) first[g] = load16(shift + 16 * g);
        for (int64_t n = 0; n < N; n++)
            for (int64_t h = 0; h < H; h++) {
                for (int64_t g = 0; g < groups; g++) part[g] = part2[g] = (f32x16){0};
                const uint16_t *row = x + row_offset(n, h, sn, sh, phase_block);
                for (int64_t w = 0; w < W; w++) {
                    const uint16_t *p = row + column_offset(w, sw, phase_block);
                    for (int64_t g = 0; g < groups; g++) {
                        f32x16 v = load16_bf16(p + 16 * g) - first[g];
                        part[g] += v;
                        part2[g] += v * v;
                    }
                }
                for (int64_t g = 0; g < groups; g++)
                    for (int c = 0; c < 16; c++) {
                        sum[16 * g + c] += part[g][c];
                        sumsq[16 * g + c] += part2[g][c];
                    }
            }
        return;
    }
    float part[MAX_CHANNELS], part2[MAX_CHANNELS];
    for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < H; h++) {
            for (int64_t c = 0; c < C; c++) part[c] = part2[c] = 0.0f;
            const uint16_t *row = x + row_offset(n, h, sn, sh, phase_block);
            for (int64_t w = 0; w < W; w++) {
                const uint16_t *p = row + column_offset(w, sw, phase_block);
#pragma omp simd
                for (int64_t c = 0; c < C; c++) {
                    float v = bf16_to_float(p[c * sc]) - shift[c];
                    part[c] += v;
                    part2[c] += v * v;
                }
            }
            for (int64_t c = 0; c < C; c++) {
                sum[c] += part[c];
                sumsq[c] += part2[c];
            }
        }
}

/* BatchNorm's per-channel affine map, scale * x + shift, for x (N, H, W, C): in training with
 * the batch's mean and biased variance, updating the running statistics (when given) with
 * the unbiased one, as torch.nn.BatchNorm2d does; otherwise from the running statistics.
 * Refuses more than MAX_CHANNELS channels, and fewer than two values a channel in training
 * (torch.nn.BatchNorm2d raises then). */
int batch_norm_scale_shift(const uint16_t *x, int64_t N, int64_t H, int64_t W, int64_t C,
                           int64_t sn, int64_t sh, int64_t sw, int64_t sc, int64_t phase_block,
                           const float *weight, const float *bias, double eps, int training,
                           double momentum, float *running_mean, float *running_var,
                           float *scale, float *shift) {
    if (C > MAX_CHANNELS || (training && N * H * W < 2) || (phase_block != 0 && sc != 1))
        return REFUSED;
    double mean[MAX_CHANNELS], var[MAX_CHANNELS];
    if (training) {
        float first[MAX_CHANNELS];
        double sum[MAX_CHANNELS], sumsq[MAX_CHANNELS];
        BY_CHANNELS(shifted_sums, C, sc, x, N, H, W, sn, sh, sw, phase_block, first, sum, sumsq);
        double count = (double)(N * H * W);
        for (int64_t c = 0; c < C; c++) {
            double centred = sum[c] / count;
            mean[c] = first[c] + centred;
            var[c] = sumsq[c] / count - centred * centred;
            if (var[c] < 0.0) var[c] = 0.0;
            if (running_mean != NULL) {
                double unbiased = var[c] * count / (count - 1.0);
                running_mean[c] = (float)((1.0 - momentum) * running_mean[c] + momentum * mean[c]);
                running_var[c] = (float)((1.0 - momentum) * running_var[c] + momentum * unbiased);
            }
        }
    } else {
        for (int64_t c = 0; c < C; c++) {
            mean[c] = running_mean[c];
            var[c] = running_var[c];
        }
    }
    for (int64_t c = 0; c < C; c++) {
        double s = (weight != NULL ? weight[c] : 1.0) / sqrt(var[c] + eps);
        scale[c] = (float)s;
        shift[c] = (float)((bias != NULL ? bias[c] : 0.0) - mean[c] * s);
    }
    return DONE;
}

/* leaky_relu(scale * x + shift, slope) of each pixel of x, written to `factor` x `factor`
 * pixels of y (factor 1: y (N, H, W, C); 2: its nearest upsampling, (N, 2H, 2W, C)) */
static inline __attribute__((always_inline)) void affine_impl(
    const int64_t C, const int64_t sc, const uint16_t *x, int64_t N, int64_t H, int64_t W,
    int64_t sn, int64_t sh, int64_t sw, int64_t phase_block, const float *scale,
    const float *shift, float slope, int64_t factor, uint16_t *y) {
    uint16_t pixel[MAX_CHANNELS];
    const int64_t row = factor * W * C;
    for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < H; h++) {
            uint16_t *first = y + (n * factor * H + factor * h) * row;
            const uint16_t *in = x + row_offset(n, h, sn, sh, phase_block);
            for (int64_t w = 0; w < W; w++) {
                const uint16_t *p = in + column_offset(w, sw, phase_block);
#pragma omp simd
                for (int64_t c = 0; c < C; c++)
                    pixel[c] = float_to_bf16(
                        leaky_relu(bf16_to_float(p[c * sc]) * scale[c] + shift[c], slope));
                for (int64_t f = 0; f < factor; f++)
                    memcpy(first + (factor * w + f) * C, pixel, C * sizeof(uint16_t));
            }
            for (int64_t f = 1; f < factor; f++)
                memcpy(first + f * row, first, row * sizeof(uint16_t));
        }
}

/* y (N, 2H, 2W, C), bf16, contiguous = nearest 2x upsampling of
 * leaky_relu(scale * x + shift, slope) for x (N, H, W, C) */
int affine_leaky_relu_upsample(const uint16_t *x, int64_t N, int64_t H, int64_t W, int64_t C,
                               int64_t sn, int64_t sh, int64_t sw, int64_t sc,
                               const float *scale, const float *shift, float slope,
                               uint16_t *y) {
    if (C > MAX_CHANNELS) return REFUSED;
    BY_CHANNELS(affine_impl, C, sc, x, N, H, W, sn, sh, sw, 0, scale, shift, slope, 2, y);
    return DONE;
}

/* y (N, H, W, C), bf16, contiguous = leaky_relu(scale * x + shift, slope) for x (N, H, W, C)
 * (or read by phase: row_offset) */
int affine_leaky_relu(const uint16_t *x, int64_t N, int64_t H, int64_t W, int64_t C, int64_t sn,
                      int64_t sh, int64_t sw, int64_t sc, int64_t phase_block,
                      const float *scale, const float *shift, float slope, uint16_t *y) {
    if (C > MAX_CHANNELS || (phase_block != 0 && sc != 1)) return REFUSED;
    BY_CHANNELS(affine_impl, C, sc, x, N, H, W, sn, sh, sw, phase_block, scale, shift, slope, 1,
                y);
    return DONE;
}

/* y (N, 2H, 2W, C), bf16, contiguous = the four phases of an upsampled convolution
 * (tadfkd.models.upsampling) put in place: pixel (2i + a, 2j + b) is pixel (i + a, j + b),
 * channels (2a + b) C to (2a + b + 1) C, of x (N, H + 1, W + 1, 4 C), unit channel stride */
int interleave_phases(const uint16_t *x, int64_t N, int64_t Hp, int64_t Wp, int64_t C4,
                      int64_t sn, int64_t sh, int64_t sw, int64_t sc, uint16_t *y) {
    const int64_t C = C4 / 4, H = Hp - 1, W = Wp - 1;
    if (sc != 1 || C4 % 4 != 0 || H < 1 || W < 1) return REFUSED;
    for (int64_t n = 0; n < N; n++)
        for (int64_t i = 0; i < H; i++)
            for (int64_t a = 0; a < 2; a++) {
                uint16_t *out = y + (n * 2 * H + 2 * i + a) * 2 * W * C;
                for (int64_t j = 0; j < W; j++)
                    for (int64_t b = 0; b < 2; b++)
                        memcpy(out + (2 * j + b) * C,
                               x + n * sn + (i + a) * sh + (j + b) * sw + (2 * a + b) * C,
                               C * sizeof(uint16_t));
            }
    return DONE;
}

/* x (N, H + 1, W + 1, 4 C), bf16, contiguous = the gradient of interleave_phases: zero, then
 * each phase's pixels of y (N, 2H, 2W, C), unit channel stride, where interleave_phases took
 * them from */
int deinterleave_phases(const uint16_t *y, int64_t N, int64_t H2, int64_t W2, int64_t C,
                        int64_t sn, int64_t sh, int64_t sw, int64_t sc, uint16_t *x) {
    const int64_t H = H2 / 2, W = W2 / 2, C4 = 4 * C;
    if (sc != 1 || H2 % 2 != 0 || W2 % 2 != 0 || H < 1 || W < 1) return REFUSED;
    memset(x, 0, (size_t)(N * (H + 1) * (W + 1) * C4) * sizeof(uint16_t));
    for (int64_t n = 0; n < N; n++)
        for (int64_t i = 0; i < H; i++)
            for (int64_t a = 0; a < 2; a++)
                for (int64_t j = 0; j < W; j++)
                    for (int64_t b = 0; b < 2; b++)
                        memcpy(x + ((n * (H + 1) + i + a) * (W + 1) + j + b) * C4 + (2 * a + b) * C,
                               y + n * sn + (2 * i + a) * sh + (2 * j + b) * sw,
                               C * sizeof(uint16_t));
    return DONE;
}

static inline f32x16 leaky_relu16(f32x16 v, float slope) {
    i32x16 positive = v > 0.0f, kept, scaled;
    f32x16 negative = v * slope;
    memcpy(&kept, &v, sizeof kept);
    memcpy(&scaled, &negative, sizeof scaled);
    kept = (kept & positive) | (scaled & ~positive);
    memcpy(&v, &kept, sizeof v);
    return v;
}

static inline float sum16(f32x16 v) {
    f32x8 a, b;
    memcpy(&a, &v, sizeof a);
    memcpy(&b, (const char *)&v + sizeof a, sizeof b);
    a += b;
    f32x4 c, d;
    memcpy(&c, &a, sizeof c);
    memcpy(&d, (const char *)&a + sizeof c, sizeof d);
    c += d;
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/* GCC from 12 and Clang: a shuffle of two vectors' lanes by constant indices (-D
 * HAVE_SHUFFLEVECTOR=0 builds without it) */
#ifndef HAVE_SHUFFLEVECTOR
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define HAVE_SHUFFLEVECTOR 1
#endif
#endif
#endif
#ifndef HAVE_SHUFFLEVECTOR
#define HAVE_SHUFFLEVECTOR 0
#endif

#if HAVE_SHUFFLEVECTOR
/* sum16 of each of 16 vectors at once, lane k the sum of v[k]: the same additions in the same
 * order as sum16's (lanes l and l + 8, then m and m + 4, then (0 + 2) + (1 + 3)), on two
 * vectors' lanes at a time: 15 additions of whole vectors (and 30 shuffles) where 16 sum16s
 * add halves, quarters and single lanes */
static inline f32x16 sum16_each(const f32x16 v[16]) {
    f32x16 a[8], b[4], d[2];
    for (int p = 0; p < 8; p++) /* per vector: lanes l + (l + 8), l < 8 */
        a[p] = __builtin_shufflevector(v[2 * p], v[2 * p + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17,
                                       18, 19, 20, 21, 22, 23) +
               __builtin_shufflevector(v[2 * p], v[2 * p + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24,
                                       25, 26, 27, 28, 29, 30, 31);
    for (int p = 0; p < 4; p++) /* per vector: m + (m + 4), m < 4 */
        b[p] = __builtin_shufflevector(a[2 * p], a[2 * p + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17,
                                       18, 19, 24, 25, 26, 27) +
               __builtin_shufflevector(a[2 * p], a[2 * p + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20,
                                       21, 22, 23, 28, 29, 30, 31);
    for (int p = 0; p < 2; p++) /* per vector: 0 + 2 and 1 + 3 */
        d[p] = __builtin_shufflevector(b[2 * p], b[2 * p + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17,
                                       20, 21, 24, 25, 28, 29) +
               __builtin_shufflevector(b[2 * p], b[2 * p + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18,
                                       19, 22, 23, 26, 27, 30, 31);
    return __builtin_shufflevector(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24,
                                   26, 28, 30) +
           __builtin_shufflevector(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25,
                                   27, 29, 31);
}
#endif

/* output pixel (i, j) of affine_leaky_relu_conv_one before its channels are summed: per lane,
 * the products of 16 channels' taps, one accumulator per kernel row */
static inline f32x16 conv_one_lanes(const float *act, int64_t row, int64_t C, int64_t groups,
                                    f32x16 taps[9][4], int64_t i, int64_t j) {
    f32x16 top = {0}, middle = {0}, bottom = {0};
    for (int64_t g = 0; g < groups; g++) {
        const float *a0 = act + i * row + j * C + 16 * g, *a1 = a0 + row, *a2 = a1 + row;
        top += load16(a0) * taps[0][g] + load16(a0 + C) * taps[1][g] +
               load16(a0 + 2 * C) * taps[2][g];
        middle += load16(a1) * taps[3][g] + load16(a1 + C) * taps[4][g] +
                  load16(a1 + 2 * C) * taps[5][g];
        bottom += load16(a2) * taps[6][g] + load16(a2 + C) * taps[7][g] +
                  load16(a2 + 2 * C) * taps[8][g];
    }
    return top + middle + bottom;
}

/* out (N, H, W), float32 = a 3x3 convolution with one output channel, padding 1, stride 1,
 * of leaky_relu(scale * x + shift, slope) for x (N, H, W, C), channels-last (unit channel
 * stride; or read by phase: row_offset), C = 16 * groups with groups <= 4; weight (3, 3, C),
 * float32. Per image: the
 * activation into a float32 buffer with a zero border (the padding), then per output pixel a
 * sum over channels and taps, one accumulator per kernel row. */
int affine_leaky_relu_conv_one(const uint16_t *x, int64_t N, int64_t H, int64_t W, int64_t C,
                               int64_t sn, int64_t sh, int64_t sw, int64_t sc,
                               int64_t phase_block, const float *scale, const float *shift,
                               float slope, const float *weight, float bias, float *out) {
    const int64_t groups = C / 16, row = (W + 2) * C;
    if (sc != 1 || C % 16 != 0 || groups > 4) return REFUSED;
    float *act = calloc((size_t)((H + 2) * row), sizeof(float));
    if (act == NULL) return NO_MEMORY;
    f32x16 scales[4], shifts[4], taps[9][4];
    for (int64_t g = 0; g < groups; g++) {
        scales[g] = load16(scale + 16 * g);
        shifts[g] = load16(shift + 16 * g);
        for (int t = 0; t < 9; t++) taps[t][g] = load16(weight + t * C + 16 * g);
    }
    for (int64_t n = 0; n < N; n++) {
        for (int64_t h = 0; h < H; h++) {
            const uint16_t *in = x + row_offset(n, h, sn, sh, phase_block);
            for (int64_t w = 0; w < W; w++) {
                const uint16_t *p = in + column_offset(w, sw, phase_block);
                float *a = act + (h + 1) * row + (w + 1) * C;
                for (int64_t g = 0; g < groups; g++) {
                    f32x16 v = leaky_relu16(load16_bf16(p + 16 * g) * scales[g] + shifts[g], slope);
                    memcpy(a + 16 * g, &v, sizeof v);
                }
            }
        }
        float *image = out + n * H * W;
        int64_t q = 0, i = 0, j = 0; /* the output pixel q = i * W + j */
#if HAVE_SHUFFLEVECTOR
        for (; q + 16 <= H * W; q += 16) { /* 16 pixels' lanes summed at once */
            f32x16 lanes[16];
            for (int64_t k = 0; k < 16; k++) {
                lanes[k] = conv_one_lanes(act, row, C, groups, taps, i, j);
                if (++j == W) j = 0, i++;
            }
            f32x16 sums = sum16_each(lanes) + bias;
            memcpy(image + q, &sums, sizeof sums);
        }
#endif
        for (; q < H * W; q++) {
            image[q] = sum16(conv_one_lanes(act, row, C, groups, taps, i, j)) + bias;
            if (++j == W) j = 0, i++;
        }
    }
    free(act);
    return DONE;
}

/* 16 floats rounded to bf16 as float_to_bf16 rounds each, in the low 16 bits of each lane */
static inline u32x16 bf16_bits16(f32x16 v) {
    u32x16 u, nan, rounded;
    memcpy(&u, &v, sizeof u);
    nan = (u32x16)((u & 0x7fffffffu) > 0x7f800000u);
    rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (rounded & ~nan) | (((u >> 16) | 0x40u) & nan);
}

static inline void store16_bf16(uint16_t *p, f32x16 v) {
    u16x16 half = __builtin_convertvector(bf16_bits16(v), u16x16);
    memcpy(p, &half, sizeof half);
}

/* 16 floats rounded to bf16, as floats (the bf16 in each lane's high 16 bits, the low ones 0) */
static inline f32x16 rounded16_bf16(f32x16 v) {
    u32x16 bits = bf16_bits16(v) << 16;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* conv_one_backward for groups (a compile-time constant where it is 1) of 16 channels */
static inline __attribute__((always_inline)) void conv_one_backward_impl(
    const int64_t groups, const uint16_t *x, int64_t N, int64_t H, int64_t W, int64_t sn,
    int64_t sh, int64_t sw, const float *gy, f32x16 (*taps)[4], float *g, float *xp,
    uint16_t *grad_x, double (*weight_sums)[MAX_CONV_ONE_CHANNELS], double *bias_sum) {
    const int64_t C = 16 * groups, Wp = W + 2;
    for (int64_t n = 0; n < N; n++) {
        for (int64_t h = 0; h < H; h++)
            for (int64_t w = 0; w < W; w++) {
                g[(h + 1) * Wp + w + 1] = gy[(n * H + h) * W + w];
                const uint16_t *p = x + n * sn + h * sh + w * sw;
                for (int64_t k = 0; k < groups; k++) {
                    f32x16 v = load16_bf16(p + 16 * k);
                    memcpy(xp + ((h + 1) * Wp + w + 1) * C + 16 * k, &v, sizeof v);
                }
            }
        /* x's gradient: each pixel's taps, by the output pixels that read it */
        for (int64_t h = 0; h < H; h++)
            for (int64_t w = 0; w < W; w++)
                for (int64_t k = 0; k < groups; k++) {
                    f32x16 sum = {0};
                    for (int64_t t = 0; t < 9; t++)
                        sum += g[(h + 2 - t / 3) * Wp + w + 2 - t % 3] * taps[t][k];
                    store16_bf16(grad_x + ((n * H + h) * W + w) * C + 16 * k, sum);
                }
        /* the weight's and the bias's: float within a row of the output, double across */
        for (int64_t i = 0; i < H; i++) {
            f32x16 part[9][4];
            float bias_part = 0.0f;
            for (int64_t t = 0; t < 9; t++)
                for (int64_t k = 0; k < groups; k++) part[t][k] = (f32x16){0};
            for (int64_t j = 0; j < W; j++) {
                const float v = g[(i + 1) * Wp + j + 1];
                bias_part += v;
                for (int64_t t = 0; t < 9; t++)
                    for (int64_t k = 0; k < groups; k++)
                        part[t][k] += v * load16(xp + ((i + t / 3) * Wp + j + t % 3) * C + 16 * k);
            }
            for (int64_t t = 0; t < 9; t++)
                for (int64_t k = 0; k < groups; k++)
                    for (int c = 0; c < 16; c++) weight_sums[t][16 * k + c] += part[t][k][c];
            *bias_sum += bias_part;
        }
    }
}

/* The gradients of out = the 3x3 convolution with one output channel, padding 1, stride 1, of
 * x (N, H, W, C) bf16 (element strides, unit channel stride; C = 16 * groups, groups <= 4)
 * with weight (3, 3, C) and a bias, float32, given out's gradient gy (N, H, W) float32:
 * grad_x (N, H, W, C) bf16, contiguous, each pixel's sum over the taps of gy where the
 * convolution read it times the tap, in float32, rounded once; grad_w (3, 3, C) and grad_b (1)
 * float32, the sums over the output pixels of gy times x at the tap's offset (zero outside)
 * and of gy. */
int conv_one_backward(const uint16_t *x, int64_t N, int64_t H, int64_t W, int64_t C, int64_t sn,
                      int64_t sh, int64_t sw, int64_t sc, const float *gy, const float *weight,
                      uint16_t *grad_x, float *grad_w, float *grad_b) {
    const int64_t groups = C / 16, Wp = W + 2;
    if (sc != 1 || C % 16 != 0 || C < 16 || C > MAX_CONV_ONE_CHANNELS) return REFUSED;
    float *g = calloc((size_t)((H + 2) * Wp), sizeof(float));     /* gy, zero border */
    float *xp = calloc((size_t)((H + 2) * Wp * C), sizeof(float)); /* x, zero border */
    if (g == NULL || xp == NULL) {
        free(g);
        free(xp);
        return NO_MEMORY;
    }
    f32x16 taps[9][4];
    for (int64_t t = 0; t < 9; t++)
        for (int64_t k = 0; k < groups; k++) taps[t][k] = load16(weight + t * C + 16 * k);
    double weight_sums[9][MAX_CONV_ONE_CHANNELS] = {{0}}, bias_sum = 0.0;
    if (groups == 1)
        conv_one_backward_impl(1, x, N, H, W, sn, sh, sw, gy, taps, g, xp, grad_x, weight_sums,
                               &bias_sum);
    else
        conv_one_backward_impl(groups, x, N, H, W, sn, sh, sw, gy, taps, g, xp, grad_x,
                               weight_sums, &bias_sum);
    for (int64_t t = 0; t < 9; t++)
        for (int64_t c = 0; c < C; c++) grad_w[t * C + c] = (float)weight_sums[t][c];
    grad_b[0] = (float)bias_sum;
    free(g);
    free(xp);
    return DONE;
}

/* torch.relu on 16 floats, x < 0 ? 0 : x: -0.0 and NaN pass as they are */
#define RELU_AS_TORCH(mask_type)                                                           \
    {                                                                                      \
        mask_type bits, negative = v < 0.0f;                                               \
        memcpy(&bits, &v, sizeof bits);                                                    \
        bits &= ~negative;                                                                 \
        memcpy(&v, &bits, sizeof v);                                                       \
        return v;                                                                          \
    }
static inline f32x16 relu16_as_torch(f32x16 v) RELU_AS_TORCH(i32x16)

/* 16 sums stored as float32 or rounded to bf16; with relu, torch.relu of what is stored (of the
 * rounded value in bf16: ReLU after the rounding, as PyTorch's ReLU of the convolution's bf16
 * output has it, so a sum that rounds to -0.0 stays -0.0). A NaN stays the NaN it rounds to;
 * PyTorch's vectorised bf16 ReLU writes every NaN as 0xffff (its scalar tail keeps the bits). */
static inline void store_sums(void *out, int64_t at, f32x16 sums, int out_bf16, int relu,
                              const int64_t lanes) { /* the first `lanes` (8 or 16) of them */
    if (out_bf16) sums = rounded16_bf16(sums); /* once: its bits are the bf16 in the high half */
    if (relu) sums = relu16_as_torch(sums);
    if (out_bf16) {
        u32x16 bits;
        memcpy(&bits, &sums, sizeof bits);
        u16x16 half = __builtin_convertvector(bits >> 16, u16x16);
        memcpy((uint16_t *)out + at, &half, (size_t)lanes * sizeof(uint16_t));
    } else {
        memcpy((float *)out + at, &sums, (size_t)lanes * sizeof(float));
    }
}

#define MAX_TAPS 49 /* a kernel of up to 7 x 7 */

#define PIXELS 4 /* output pixels of a row computed together: independent sums in flight */

/* one image's output (Ho, Wo, C) from its zero-padded float32 copy (Hp, Wp): each output's
 * sums start at the bias and add the taps in row order, PIXELS outputs of a row at a time; C is
 * 16 * groups, or 8 (one group of which lanes 8 to 15, their taps zero, are not stored) */
static inline __attribute__((always_inline)) void single_channel_image(
    const int64_t groups, const int64_t C, const int64_t K, const float *padded, int64_t Wp,
    int64_t stride, int64_t Ho, int64_t Wo, const f32x16 (*taps)[4], const f32x16 *bias,
    void *out, int out_bf16, int relu) {
    const int64_t lanes = C < 16 ? C : 16;
    for (int64_t i = 0; i < Ho; i++)
        for (int64_t j0 = 0; j0 < Wo; j0 += PIXELS) {
            const int64_t count = Wo - j0 < PIXELS ? Wo - j0 : PIXELS;
            f32x16 sums[PIXELS][4];
            for (int64_t p = 0; p < PIXELS; p++)
                for (int64_t g = 0; g < groups; g++) sums[p][g] = bias[g];
            const float *corner = padded + i * stride * Wp + j0 * stride;
            for (int64_t ki = 0; ki < K; ki++)
                for (int64_t kj = 0; kj < K; kj++)
                    for (int64_t p = 0; p < PIXELS; p++) {
                        /* past the row's end (p >= count): a value inside the padded image,
                         * summed but never stored */
                        float v = corner[ki * Wp + (p < count ? p : 0) * stride + kj];
                        for (int64_t g = 0; g < groups; g++)
                            sums[p][g] += v * taps[ki * K + kj][g];
                    }
            for (int64_t p = 0; p < count; p++)
                for (int64_t g = 0; g < groups; g++)
                    store_sums(out, ((i * Wo + j0 + p) * C) + 16 * g, sums[p][g], out_bf16,
                               relu, lanes);
        }
}

static inline float rounded_to_bf16(float v) { return bf16_to_float(float_to_bf16(v)); }

/* out (N, Ho, Wo, C), contiguous, = the K x K convolution, stride and zero padding as given, of
 * x (N, H, W) (one input channel; element strides; float32, or bf16 when x_bf16) with weight
 * (C, K, K) (element strides) and bias (C,) or NULL, both float32; C = 16 * groups with
 * groups <= 4, or 8; K <= 7. Sums in float32 over the taps in row order, after the bias. With bf16,
 * as bf16 autocast runs the convolution: input, weight and bias rounded to bf16 first, out
 * bf16; else out float32. With relu, out = torch.relu of that output (store_sums). */
int single_channel_conv(const void *x, int x_bf16, int64_t N, int64_t H, int64_t W, int64_t sn,
                        int64_t sh, int64_t sw, const float *weight, int64_t C, int64_t K,
                        int64_t swc, int64_t swh, int64_t sww, const float *bias, int64_t stride,
                        int64_t padding, int bf16, int relu, void *out) {
    const int64_t groups = (C + 15) / 16, Hp = H + 2 * padding, Wp = W + 2 * padding;
    if ((C % 16 != 0 && C != 8) || groups < 1 || groups > 4 || K < 1 || K * K > MAX_TAPS ||
        stride < 1 || padding < 0 || Hp < K || Wp < K)
        return REFUSED;
    const int64_t Ho = (Hp - K) / stride + 1, Wo = (Wp - K) / stride + 1;
    float *padded = calloc((size_t)(Hp * Wp), sizeof(float));
    if (padded == NULL) return NO_MEMORY;
    f32x16 taps[MAX_TAPS][4], start[4];
    float lane[16];
    for (int64_t g = 0; g < groups; g++) {
        for (int64_t t = 0; t <= K * K; t++) { /* the K * K taps, then the bias */
            for (int64_t c = 0; c < 16; c++) {
                int64_t channel = 16 * g + c;
                float v = channel >= C ? 0.0f /* lanes 8 to 15 of 8 channels: never stored */
                          : t < K * K  ? weight[channel * swc + (t / K) * swh + (t % K) * sww]
                          : bias != NULL ? bias[channel]
                                         : 0.0f;
                lane[c] = bf16 ? rounded_to_bf16(v) : v;
            }
            if (t < K * K)
                taps[t][g] = load16(lane);
            else
                start[g] = load16(lane);
        }
    }
    const int64_t image = Ho * Wo * C * (bf16 ? 2 : 4);
    for (int64_t n = 0; n < N; n++) {
        for (int64_t h = 0; h < H; h++)
            for (int64_t w = 0; w < W; w++) {
                int64_t at = n * sn + h * sh + w * sw;
                float v = x_bf16 ? bf16_to_float(((const uint16_t *)x)[at]) : ((const float *)x)[at];
                padded[(h + padding) * Wp + w + padding] = bf16 && !x_bf16 ? rounded_to_bf16(v) : v;
            }
        void *image_out = (char *)out + n * image;
        /* the kernel size and channel groups as compile-time constants for 3 x 3 */
        if (K == 3 && C == 8)
            single_channel_image(1, 8, 3, padded, Wp, stride, Ho, Wo, taps, start, image_out,
                                 bf16, relu);
        else if (K == 3 && C == 16)
            single_channel_image(1, 16, 3, padded, Wp, stride, Ho, Wo, taps, start, image_out,
                                 bf16, relu);
        else if (K == 3 && C == 32)
            single_channel_image(2, 32, 3, padded, Wp, stride, Ho, Wo, taps, start, image_out,
                                 bf16, relu);
        else
            single_channel_image(groups, C, K, padded, Wp, stride, Ho, Wo, taps, start,
                                 image_out, bf16, relu);
    }
    free(padded);
    return DONE;
}

/* A ReLU followed by a 2x2 max pool of stride 2, or by a global average pool
 * (tadfkd.models.pooling), forward and backward, in one pass each. Tensors are contiguous
 * channels-last, (N, H, W, C): float32, or bf16 when bf16; the gradients in x's dtype. */

/* ReLU(v) with a NaN kept a NaN, as torch.relu keeps it */
static inline float relu_keeping_nan(float v) { return v > 0.0f || v != v ? v : 0.0f; }

/* a later value v wins a pooling window over the largest so far, m, where it is larger or a
 * NaN, as PyTorch's CPU max pool has it (the backward's form: GCC vectorises its selects) */
#define WINS(v, m) (((v) > (m)) | ((v) != (v)))

/* the largest of a, b with a NaN winning, as max pooling picks a NaN: WINS(b, a), in the form
 * GCC vectorises in the forward's loop (with WINS there, it did not) */
static inline float max_keeping_nan(float a, float b) { return b > a || b != b ? b : a; }

#define RELU_MAX_POOL(type, load, store)                                                    \
    for (int64_t n = 0; n < N; n++)                                                         \
        for (int64_t i = 0; i < Ho; i++)                                                    \
            for (int64_t j = 0; j < Wo; j++) {                                              \
                const type *a = (const type *)x + ((n * H + 2 * i) * W + 2 * j) * C;        \
                const type *b = a + C, *c = a + W * C, *d = c + C;                          \
                type *o = (type *)out + ((n * Ho + i) * Wo + j) * C;                        \
                _Pragma("omp simd") for (int64_t k = 0; k < C; k++) {                      \
                    float m = max_keeping_nan(max_keeping_nan(load(a[k]), load(b[k])),      \
                                              max_keeping_nan(load(c[k]), load(d[k])));     \
                    o[k] = store(relu_keeping_nan(m));                                      \
                }                                                                           \
            }

static inline float as_float(float v) { return v; }

/* out (N, H / 2, W / 2, C) = the 2x2, stride-2 max pool of ReLU(x), x (N, H, W, C); odd sizes
 * leave out the last row or column, as MaxPool2d(2) does. Exact: max and ReLU commute and
 * round nothing. */
int relu_max_pool(const void *x, int bf16, int64_t N, int64_t H, int64_t W, int64_t C,
                  void *out) {
    const int64_t Ho = H / 2, Wo = W / 2;
    if (Ho < 1 || Wo < 1 || C < 1) return REFUSED;
    if (bf16) {
        RELU_MAX_POOL(uint16_t, bf16_to_float, float_to_bf16)
    } else {
        RELU_MAX_POOL(float, as_float, as_float)
    }
    return DONE;
}

/* ReLU's gradient passes where v is not <= 0: positive or NaN, as torch's ReLU backward has it */
static inline int relu_passes(float v) { return !(v <= 0.0f); }

/* a float that holds a bf16 value exactly, as that bf16 (no rounding: no branch) */
static inline uint16_t exact_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)(u >> 16);
}

/* each window's gradient g, at the value max pooling picks (the first largest, row by row,
 * or the last NaN, as PyTorch's CPU kernel picks) where ReLU passes it, zero at the other
 * three; as float selects, so that the channel loop vectorises */
#define RELU_MAX_POOL_BACKWARD(type, load, store)                                           \
    if (H % 2 != 0 || W % 2 != 0) /* the row or column no window covers */                  \
        memset(grad_in, 0, (size_t)(N * H * W * C) * sizeof(type));                        \
    for (int64_t n = 0; n < N; n++)                                                         \
        for (int64_t i = 0; i < Ho; i++)                                                    \
            for (int64_t j = 0; j < Wo; j++) {                                              \
                const int64_t corner = ((n * H + 2 * i) * W + 2 * j) * C;                   \
                const type *a = (const type *)x + corner, *b = a + C, *c = a + W * C;       \
                const type *d = c + C;                                                      \
                const type *g = (const type *)grad + ((n * Ho + i) * Wo + j) * C;           \
                type *ia = (type *)grad_in + corner, *ib = ia + C, *ic = ia + W * C;        \
                type *id = ic + C;                                                          \
                _Pragma("omp simd") for (int64_t k = 0; k < C; k++) {                      \
                    const float va = load(a[k]), vb = load(b[k]), vc = load(c[k]);          \
                    const float vd = load(d[k]);                                            \
                    const float mb = WINS(vb, va) ? vb : va, mc = WINS(vc, mb) ? vc : mb;   \
                    const float md = WINS(vd, mc) ? vd : mc;                                \
                    const float passed = md <= 0.0f ? 0.0f : load(g[k]); /* ReLU's */       \
                    const float before_d = WINS(vd, mc) ? 0.0f : passed;                    \
                    const float before_c = WINS(vc, mb) ? 0.0f : before_d;                  \
                    id[k] = store(WINS(vd, mc) ? passed : 0.0f);                            \
                    ic[k] = store(WINS(vc, mb) ? before_d : 0.0f);                          \
                    ib[k] = store(WINS(vb, va) ? before_c : 0.0f);                          \
                    ia[k] = store(WINS(vb, va) ? 0.0f : before_c);                          \
                }                                                                           \
            }

/* grad_in (N, H, W, C) = relu_max_pool's gradient for grad (N, H / 2, W / 2, C): each window's
 * gradient at the element max pooling picks where ReLU passes it, zero elsewhere */
int relu_max_pool_backward(const void *x, int bf16, int64_t N, int64_t H, int64_t W, int64_t C,
                           const void *grad, void *grad_in) {
    const int64_t Ho = H / 2, Wo = W / 2;
    if (Ho < 1 || Wo < 1 || C < 1) return REFUSED;
    if (bf16) {
        RELU_MAX_POOL_BACKWARD(uint16_t, bf16_to_float, exact_bf16)
    } else {
        RELU_MAX_POOL_BACKWARD(float, as_float, as_float)
    }
    return DONE;
}

#define RELU_MEAN(type, load, store)                                                        \
    for (int64_t n = 0; n < N; n++) {                                                       \
        for (int64_t k = 0; k < C; k++) sums[k] = 0.0f;                                     \
        for (int64_t p = 0; p < P; p++) {                                                   \
            const type *row = (const type *)x + (n * P + p) * C;                            \
            _Pragma("omp simd") for (int64_t k = 0; k < C; k++) sums[k] +=                 \
                relu_keeping_nan(load(row[k]));                                             \
        }                                                                                   \
        for (int64_t k = 0; k < C; k++) ((type *)out)[n * C + k] = store(sums[k] / (float)P); \
    }

/* out (N, C) = the mean of ReLU(x) over each image's P = H * W pixels, x (N, P, C): float32
 * sums in pixel order, divided by P, rounded once to out's dtype */
int relu_mean(const void *x, int bf16, int64_t N, int64_t P, int64_t C, void *out) {
    if (P < 1 || C < 1 || C > MAX_CHANNELS) return REFUSED;
    float sums[MAX_CHANNELS];
    if (bf16) {
        RELU_MEAN(uint16_t, bf16_to_float, float_to_bf16)
    } else {
        RELU_MEAN(float, as_float, as_float)
    }
    return DONE;
}

#define RELU_MEAN_BACKWARD(type, load, store)                                               \
    for (int64_t n = 0; n < N; n++) {                                                       \
        for (int64_t k = 0; k < C; k++) /* rounded to the dtype, as the mean's backward */  \
            share[k] = load(store(load(((const type *)grad)[n * C + k]) / (float)P));       \
        for (int64_t p = 0; p < P; p++) {                                                   \
            const int64_t at = (n * P + p) * C;                                             \
            const type *row = (const type *)x + at;                                         \
            type *into = (type *)grad_in + at;                                              \
            _Pragma("omp simd") for (int64_t k = 0; k < C; k++) into[k] =                  \
                store(relu_passes(load(row[k])) ? share[k] : 0.0f);                         \
        }                                                                                   \
    }

/* grad_in (N, P, C) = relu_mean's gradient for grad (N, C): grad / P (rounded to the dtype, as
 * the mean's backward divides) where ReLU passes it (x positive or NaN), else zero */
int relu_mean_backward(const void *x, int bf16, int64_t N, int64_t P, int64_t C,
                       const void *grad, void *grad_in) {
    if (P < 1 || C < 1 || C > MAX_CHANNELS) return REFUSED;
    float share[MAX_CHANNELS];
    if (bf16) {
        RELU_MEAN_BACKWARD(uint16_t, bf16_to_float, float_to_bf16)
    } else {
        RELU_MEAN_BACKWARD(float, as_float, as_float)
    }
    return DONE;
}

/* TA-DFKD's selection (tadfkd.distillation.selection): a two-Gaussian mixture fitted to each
 * row of per-sample losses, as fit_two_gaussians does in numpy, in float64 with the same
 * operations in the same order; sums as numpy's pairwise sum, so that they equal numpy's bit
 * for bit (exp and log are the C library's, numpy's own differ from them by an ulp at most). */

/* numpy's pairwise summation of a[0..n): eight running sums up to 128 values, halves above */
static double pairwise_sum(const double *a, int64_t n) {
    if (n < 8) {
        double sum = 0.0;
        for (int64_t i = 0; i < n; i++) sum += a[i];
        return sum;
    }
    if (n <= 128) {
        double r[8];
        int64_t i;
        for (int j = 0; j < 8; j++) r[j] = a[j];
        for (i = 8; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; j++) r[j] += a[i + j];
        double sum = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) sum += a[i];
        return sum;
    }
    int64_t half = n / 2;
    half -= half % 8;
    return pairwise_sum(a, half) + pairwise_sum(a + half, n - half);
}

static int compare_doubles(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* weights, means and variances of the two components from responsibilities r0, r1 (n each);
 * scratch holds n values */
static void m_step(const double *x, const double *r0, const double *r1, int64_t n,
                   double reg_covar, double *scratch, double weight[2], double mean[2],
                   double var[2]) {
    const double *resp[2] = {r0, r1};
    double mass[2];
    for (int k = 0; k < 2; k++) {
        mass[k] = pairwise_sum(resp[k], n) + 10.0 * 2.220446049250313e-16;
        for (int64_t i = 0; i < n; i++) scratch[i] = resp[k][i] * x[i];
        mean[k] = pairwise_sum(scratch, n) / mass[k];
        for (int64_t i = 0; i < n; i++) {
            double d = x[i] - mean[k];
            scratch[i] = resp[k][i] * (d * d);
        }
        var[k] = pairwise_sum(scratch, n) / mass[k] + reg_covar;
    }
    double total = mass[0] + mass[1];
    weight[0] = mass[0] / total;
    weight[1] = mass[1] / total;
}

/* the mean log-likelihood of x; log_resp0, log_resp1 the log responsibilities (n each) */
static double e_step(const double *x, int64_t n, const double weight[2], const double mean[2],
                     const double var[2], double *log_resp0, double *log_resp1,
                     double *scratch) {
    const double log_2pi = log(2.0 * 3.141592653589793);
    double *joint[2] = {log_resp0, log_resp1};
    for (int k = 0; k < 2; k++) {
        double first = log_2pi + log(var[k]), log_weight = log(weight[k]);
        for (int64_t i = 0; i < n; i++) {
            double d = x[i] - mean[k];
            joint[k][i] = -0.5 * (first + d * d / var[k]) + log_weight;
        }
    }
    for (int64_t i = 0; i < n; i++) {
        double top = log_resp0[i] > log_resp1[i] ? log_resp0[i] : log_resp1[i];
        double norm = top + log(exp(log_resp0[i] - top) + exp(log_resp1[i] - top));
        scratch[i] = norm;
        log_resp0[i] -= norm;
        log_resp1[i] -= norm;
    }
    return pairwise_sum(scratch, n) / (double)n;
}

/* posterior (rows, n), float32 = each row of losses' (rows, n) probability of the lower-mean
 * component: min-max normalised, started from the optimal 2-means split, stopped once the mean
 * log-likelihood changes by less than tol or after max_iter rounds; 1 for a row whose losses
 * are all equal or hold a NaN */
int two_gaussian_posterior(const double *losses, int64_t rows, int64_t n, int64_t max_iter,
                           double tol, double reg_covar, float *posterior) {
    if (n < 2) return REFUSED;
    double *work = malloc((size_t)(5 * n) * sizeof(double));
    if (work == NULL) return NO_MEMORY;
    double *x = work, *ordered = work + n, *r0 = work + 2 * n, *r1 = work + 3 * n;
    double *scratch = work + 4 * n;
    for (int64_t row = 0; row < rows; row++) {
        const double *loss = losses + row * n;
        float *out = posterior + row * n;
        double low = loss[0], high = loss[0];
        int has_nan = 0;
        for (int64_t i = 0; i < n; i++) {
            has_nan |= loss[i] != loss[i];
            low = loss[i] < low ? loss[i] : low;
            high = loss[i] > high ? loss[i] : high;
        }
        if (has_nan || !(high > low)) {
            for (int64_t i = 0; i < n; i++) out[i] = 1.0f;
            continue;
        }
        for (int64_t i = 0; i < n; i++) ordered[i] = x[i] = (loss[i] - low) / (high - low);
        qsort(ordered, (size_t)n, sizeof(double), compare_doubles);
        /* the split after the prefix of least summed squared error (the first such) */
        double csum = 0.0, csum_sq = 0.0, total = 0.0, total_sq = 0.0;
        for (int64_t i = 0; i < n; i++) {
            total += ordered[i];
            total_sq += ordered[i] * ordered[i];
        }
        int64_t best = 0;
        double least = INFINITY;
        for (int64_t i = 0; i + 1 < n; i++) {
            csum += ordered[i];
            csum_sq += ordered[i] * ordered[i];
            double left = (double)(i + 1), rest = total - csum;
            double sse = (csum_sq - csum * csum / left) +
                         ((total_sq - csum_sq) - rest * rest / ((double)n - left));
            if (sse < least) { /* strictly: the first least, as numpy's argmin */
                least = sse;
                best = i;
            }
        }
        for (int64_t i = 0; i < n; i++) {
            r1[i] = x[i] > ordered[best] ? 1.0 : 0.0;
            r0[i] = 1.0 - r1[i];
        }
        double weight[2], mean[2], var[2], lower_bound = -INFINITY;
        m_step(x, r0, r1, n, reg_covar, scratch, weight, mean, var);
        for (int64_t round = 0; round < max_iter; round++) {
            double bound = e_step(x, n, weight, mean, var, r0, r1, scratch);
            for (int64_t i = 0; i < n; i++) {
                r0[i] = exp(r0[i]);
                r1[i] = exp(r1[i]);
            }
            m_step(x, r0, r1, n, reg_covar, scratch, weight, mean, var);
            if (fabs(bound - lower_bound) < tol) break;
            lower_bound = bound;
        }
        e_step(x, n, weight, mean, var, r0, r1, scratch);
        const double *clean = mean[0] <= mean[1] ? r0 : r1;
        for (int64_t i = 0; i < n; i++) out[i] = (float)exp(clean[i]);
    }
    free(work);
    return DONE;
}

/* BatchNorm in training, forward and backward (tadfkd.models.batchnorm): x (M, C), the M = N H W
 * pixels of a contiguous channels-last tensor, float32, or bf16 when bf16; statistics, weights
 * and their gradients float32. The loops run over the flat tensor in spans of SPAN values (a
 * whole number of pixels where C divides SPAN, else one pixel, up to MAX_CHANNELS values:
 * the span arrays hold MAX_SPAN), with each per-channel value
 * repeated along the span, so that few channels still fill whole vectors; sums float32 within
 * SPANS_A_CHUNK spans, double across them. */

#define SPAN 64
#define MAX_SPAN MAX_CHANNELS
#define SPANS_A_CHUNK 32

static inline __attribute__((always_inline)) float load_at(const void *p, int64_t i,
                                                           const int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline __attribute__((always_inline)) void store_at(void *p, int64_t i, float v,
                                                           const int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = float_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

static inline int64_t span_of(int64_t C) { return C <= SPAN && SPAN % C == 0 ? SPAN : C; }

/* value[c] repeated along a span: out[j] = value[j % C] */
static inline void along_span(const float *value, int64_t C, int64_t span, float *out) {
    for (int64_t j = 0; j < span; j++) out[j] = value[j % C];
}

/* per channel, the sums over pixels of a(x) and b(x) (a, b given as expressions of v, the
 * value of x, g, that of grad, and j, the place in the span), as double */
#define SPAN_SUMS(a_expr, b_expr, sum_a, sum_b)                                             \
    do {                                                                                    \
        double total_a[MAX_SPAN], total_b[MAX_SPAN];                                        \
        for (int64_t j = 0; j < span; j++) total_a[j] = total_b[j] = 0.0;                    \
        for (int64_t i0 = 0; i0 < size; i0 += span * SPANS_A_CHUNK) {                        \
            float part_a[MAX_SPAN], part_b[MAX_SPAN];                                       \
            for (int64_t j = 0; j < span; j++) part_a[j] = part_b[j] = 0.0f;                 \
            const int64_t end = i0 + span * SPANS_A_CHUNK < size ? i0 + span * SPANS_A_CHUNK \
                                                                 : size;                    \
            for (int64_t i = i0; i < end; i += span) {                                      \
                const int64_t n = end - i < span ? end - i : span;                          \
                _Pragma("omp simd") for (int64_t j = 0; j < n; j++) {                      \
                    const float v = load_at(x, i + j, bf16);                                \
                    const float g = GRAD_AT(i + j);                                         \
                    (void)g;                                                                \
                    part_a[j] += (a_expr);                                                  \
                    part_b[j] += (b_expr);                                                  \
                }                                                                           \
            }                                                                               \
            for (int64_t j = 0; j < span; j++) {                                           \
                total_a[j] += part_a[j];                                                    \
                total_b[j] += part_b[j];                                                    \
            }                                                                               \
        }                                                                                   \
        for (int64_t c = 0; c < C; c++) sum_a[c] = sum_b[c] = 0.0;                          \
        for (int64_t j = 0; j < span; j++) {                                                \
            sum_a[j % C] += total_a[j];                                                     \
            sum_b[j % C] += total_b[j];                                                     \
        }                                                                                   \
    } while (0)

static inline __attribute__((always_inline)) void batch_norm_train_impl(
    const int64_t C, const int bf16, const void *x, int64_t M, const float *weight,
    const float *bias, double eps, double momentum, float *running_mean, float *running_var,
    float *mean_out, float *invstd_out, void *out) {
    const int64_t span = span_of(C), size = M * C;
    float first[MAX_CHANNELS], alpha[MAX_CHANNELS], beta[MAX_CHANNELS];
    float shift[MAX_SPAN], alpha_span[MAX_SPAN], beta_span[MAX_SPAN];
    double sum[MAX_CHANNELS], sumsq[MAX_CHANNELS];
    /* shifted by the first pixel's values: E[x^2] - E[x]^2 stays exact with a large mean */
    for (int64_t c = 0; c < C; c++) first[c] = load_at(x, c, bf16);
    along_span(first, C, span, shift);
#define GRAD_AT(i) 0.0f
    SPAN_SUMS(v - shift[j], (v - shift[j]) * (v - shift[j]), sum, sumsq);
#undef GRAD_AT
    const double count = (double)M;
    for (int64_t c = 0; c < C; c++) {
        double centred = sum[c] / count, mean = first[c] + centred;
        double var = sumsq[c] / count - centred * centred;
        if (var < 0.0) var = 0.0;
        double invstd = 1.0 / sqrt(var + eps);
        running_mean[c] = (float)((1.0 - momentum) * running_mean[c] + momentum * mean);
        running_var[c] =
            (float)((1.0 - momentum) * running_var[c] + momentum * var * count / (count - 1.0));
        mean_out[c] = (float)mean;
        invstd_out[c] = (float)invstd;
        alpha[c] = (float)(invstd * weight[c]);
        beta[c] = (float)(bias[c] - mean * invstd * weight[c]);
    }
    along_span(alpha, C, span, alpha_span);
    along_span(beta, C, span, beta_span);
    for (int64_t i = 0; i < size; i += span) {
        const int64_t n = size - i < span ? size - i : span;
#pragma omp simd
        for (int64_t j = 0; j < n; j++)
            store_at(out, i + j, load_at(x, i + j, bf16) * alpha_span[j] + beta_span[j], bf16);
    }
}

/* run the always-inlined `kernel` with the dtype, and with the channel count a compile-time
 * constant for 8, 16, 32 and 64 channels */
#define BY_DTYPE_AND_CHANNELS(kernel, C, bf16, ...)                      \
    do {                                                                 \
        if (bf16) {                                                      \
            if ((C) == 8) kernel(8, 1, __VA_ARGS__);                     \
            else if ((C) == 16) kernel(16, 1, __VA_ARGS__);              \
            else if ((C) == 32) kernel(32, 1, __VA_ARGS__);              \
            else if ((C) == 64) kernel(64, 1, __VA_ARGS__);              \
            else kernel(C, 1, __VA_ARGS__);                              \
        } else {                                                         \
            if ((C) == 8) kernel(8, 0, __VA_ARGS__);                     \
            else if ((C) == 16) kernel(16, 0, __VA_ARGS__);              \
            else if ((C) == 32) kernel(32, 0, __VA_ARGS__);              \
            else if ((C) == 64) kernel(64, 0, __VA_ARGS__);              \
            else kernel(C, 0, __VA_ARGS__);                              \
        }                                                                \
    } while (0)

/* out (M, C) = BatchNorm of x with the batch's mean and biased variance, weight and bias;
 * running_mean and running_var updated with momentum (the unbiased variance), mean_out and
 * invstd_out (1 / sqrt(var + eps)) kept for the backward, as torch.nn.BatchNorm2d in training.
 * Refuses more than MAX_CHANNELS channels and fewer than two pixels (torch raises then). */
int batch_norm_train(const void *x, int bf16, int64_t M, int64_t C, const float *weight,
                     const float *bias, double eps, double momentum, float *running_mean,
                     float *running_var, float *mean_out, float *invstd_out, void *out) {
    if (C < 1 || C > MAX_CHANNELS || M < 2) return REFUSED;
    BY_DTYPE_AND_CHANNELS(batch_norm_train_impl, C, bf16, x, M, weight, bias, eps, momentum,
                          running_mean, running_var, mean_out, invstd_out, out);
    return DONE;
}

static inline __attribute__((always_inline)) void batch_norm_train_backward_impl(
    const int64_t C, const int bf16, const void *x, const void *grad, int64_t M,
    const float *weight, const float *mean, const float *invstd, void *grad_in,
    float *grad_weight, float *grad_bias) {
    const int64_t span = span_of(C), size = M * C;
    float mean_span[MAX_SPAN], k[MAX_CHANNELS], grad_mean[MAX_CHANNELS], scale[MAX_CHANNELS];
    float k_span[MAX_SPAN], grad_mean_span[MAX_SPAN], scale_span[MAX_SPAN];
    double sum_g[MAX_CHANNELS], dot[MAX_CHANNELS];
    along_span(mean, C, span, mean_span);
#define GRAD_AT(i) load_at(grad, i, bf16)
    SPAN_SUMS(g, (v - mean_span[j]) * g, sum_g, dot);
    for (int64_t c = 0; c < C; c++) {
        k[c] = (float)(dot[c] * invstd[c] * invstd[c] / (double)M);
        grad_mean[c] = (float)(sum_g[c] / (double)M);
        scale[c] = invstd[c] * weight[c];
        grad_weight[c] = (float)(dot[c] * invstd[c]);
        grad_bias[c] = (float)sum_g[c];
    }
    along_span(k, C, span, k_span);
    along_span(grad_mean, C, span, grad_mean_span);
    along_span(scale, C, span, scale_span);
    for (int64_t i = 0; i < size; i += span) {
        const int64_t n = size - i < span ? size - i : span;
#pragma omp simd
        for (int64_t j = 0; j < n; j++) {
            const float centred = load_at(x, i + j, bf16) - mean_span[j];
            const float g = GRAD_AT(i + j) - grad_mean_span[j] - centred * k_span[j];
            store_at(grad_in, i + j, g * scale_span[j], bf16);
        }
    }
#undef GRAD_AT
}

/* batch_norm_train's gradients for grad (M, C) of its output: grad_in (M, C), in x's dtype,
 * and those of weight and bias, as torch's BatchNorm backward in training computes them */
int batch_norm_train_backward(const void *x, const void *grad, int bf16, int64_t M, int64_t C,
                              const float *weight, const float *mean, const float *invstd,
                              void *grad_in, float *grad_weight, float *grad_bias) {
    if (C < 1 || C > MAX_CHANNELS || M < 1) return REFUSED;
    BY_DTYPE_AND_CHANNELS(batch_norm_train_backward_impl, C, bf16, x, grad, M, weight, mean,
                          invstd, grad_in, grad_weight, grad_bias);
    return DONE;
}

/* ---- A 3x3 convolution (stride 1, zero padding 1) in float32 by Winograd's F(m x m, 3x3), m
 * = 2 or 4 (tadfkd.models.winograd): each m x m block of output pixels (a tile) from the
 * a x a input pixels around it (a = m + 2), as a^2 products per channel pair where the direct
 * sums take 9 m^2: 16 where they take 36 (m = 2), 36 where they take 144 (m = 4). x (N, H, W, C)
 * and the output are float32, channels-last; C and O multiples of 16. The weight comes
 * transformed (U = G g G^T, (a^2, C, O), made once on the host), the input tiles are
 * transformed here (V = B^T d B: additions, and for m = 4 products by 2, 4 and 5), then for
 * each of the a^2 positions one product (T, C) x (C, O) over the tiles of a group of images,
 * and the output transform (Y = A^T M A: additions, and for m = 4 products by 2, 4 and 8) with
 * the bias, and in the same pass either nothing more, a ReLU and a 2x2 max pool, or a ReLU and
 * the mean over the image. Float rounding differs from the direct sums (the transforms'
 * operations, fused multiply-adds), more for m = 4, whose transforms' coefficients are larger:
 * not bit for bit.
 */
/* The products run on the widest vectors the CPU has, whose operations GCC and Clang emit
 * directly (a vector of 16 floats on a CPU without AVX-512 is split by the compiler, and in
 * these products the split ran many times slower than oneDNN): AVX-512's 16 floats, AVX's 8,
 * else 4 (SSE, NEON). A block keeps rows of tiles by up to four vectors of outputs in registers:
 * six rows with AVX-512's 32 registers (24 sums, 4 weights, 1 input), two with 16 (8, 4, 1). */
#define WINOGRAD_MAX_OUTPUTS 128
#if defined(__AVX512F__)
#define WINOGRAD_LANES 16
#define WINOGRAD_BLOCK_ROWS 6
#elif defined(__AVX__)
#define WINOGRAD_LANES 8
#define WINOGRAD_BLOCK_ROWS 2
#else
#define WINOGRAD_LANES 4
#define WINOGRAD_BLOCK_ROWS 2
#endif
_Static_assert(16 % WINOGRAD_LANES == 0, "channels come in multiples of 16: whole vectors");
_Static_assert(WINOGRAD_BLOCK_ROWS >= 2, "the row remainders take blocks of 2, then 1");
typedef float winograd_vector __attribute__((vector_size(4 * WINOGRAD_LANES)));
/* the same vector at any float's address, read and written in one access (a memcpy per vector
 * became, built for AVX2, a loop of 16-byte copies through the stack) */
typedef float winograd_unaligned
    __attribute__((vector_size(4 * WINOGRAD_LANES), aligned(4), may_alias));
#define WINOGRAD_CHUNK (4 * WINOGRAD_LANES) /* outputs a block computes: four vectors */

/* contracting a * b + c into one rounding in these functions only (the file's flags keep
 * products and sums apart everywhere else) */
#if defined(__clang__)
#define CONTRACTED
#define CONTRACT_HERE _Pragma("clang fp contract(fast)")
#else
#define CONTRACTED __attribute__((optimize("fp-contract=fast")))
#define CONTRACT_HERE
#endif

/* rows 0 .. R - 1 of M (T, O) = V (T, C) x U (C, O) for the K vectors of outputs from M's and
 * U's first column (the caller's offset), in registers */
static inline __attribute__((always_inline)) CONTRACTED void
winograd_block(const int R, const int K, const float *V, const float *U, float *M, int64_t C,
               int64_t O) {
    CONTRACT_HERE
    winograd_vector acc[WINOGRAD_BLOCK_ROWS][4];
    for (int r = 0; r < R; r++)
        for (int k = 0; k < K; k++) acc[r][k] = (winograd_vector){0};
    for (int64_t c = 0; c < C; c++) {
        winograd_vector b[4];
        for (int k = 0; k < K; k++)
            b[k] = *(const winograd_unaligned *)(U + c * O + WINOGRAD_LANES * k);
        for (int r = 0; r < R; r++) {
            const winograd_vector a = V[r * C + c] - (winograd_vector){0}; /* broadcast */
            for (int k = 0; k < K; k++) acc[r][k] += a * b[k];
        }
    }
    for (int r = 0; r < R; r++)
        for (int k = 0; k < K; k++)
            *(winograd_unaligned *)(M + r * O + WINOGRAD_LANES * k) = acc[r][k];
}

/* all T rows for K vectors of outputs at u's and m's first columns: blocks of
 * WINOGRAD_BLOCK_ROWS rows, then of 2, then 1 */
#define WINOGRAD_ROWS(R, K, u, m)                                                          \
    for (; t + (R) <= T; t += (R)) winograd_block(R, K, V + t * C, u, m + t * O, C, O)
#define WINOGRAD_COLUMNS(K, u, m)                                                          \
    do {                                                                                   \
        int64_t t = 0;                                                                     \
        WINOGRAD_ROWS(WINOGRAD_BLOCK_ROWS, K, u, m);                                       \
        WINOGRAD_ROWS(2, K, u, m);                                                         \
        WINOGRAD_ROWS(1, K, u, m);                                                         \
    } while (0)

/* M (T, O) = V (T, C) x U (C, O), WINOGRAD_CHUNK outputs at a time (O a multiple of 16, so
 * of the lanes) */
static CONTRACTED void winograd_gemm(const float *V, const float *U, float *M, int64_t T,
                                     int64_t C, int64_t O) {
    for (int64_t o = 0; o < O; o += WINOGRAD_CHUNK) {
        const float *u = U + o;
        float *m = M + o;
        switch ((O - o < WINOGRAD_CHUNK ? O - o : WINOGRAD_CHUNK) / WINOGRAD_LANES) {
        case 1: WINOGRAD_COLUMNS(1, u, m); break;
        case 2: WINOGRAD_COLUMNS(2, u, m); break;
        case 3: WINOGRAD_COLUMNS(3, u, m); break;
        default: WINOGRAD_COLUMNS(4, u, m); break;
        }
    }
}

typedef int32_t winograd_mask __attribute__((vector_size(4 * WINOGRAD_LANES)));
#define WINOGRAD_LOAD(p) ((winograd_vector)(*(const winograd_unaligned *)(p)))
#define WINOGRAD_STORE(p, v) (*(winograd_unaligned *)(p) = (v))
#define WINOGRAD_MAX_VECTORS (WINOGRAD_MAX_OUTPUTS / WINOGRAD_LANES)

/* B^T d for one column (or row) d of an input tile: 4 values (m = 2) */
static inline void winograd_bt4(const winograd_vector d[4], winograd_vector t[4]) {
    t[0] = d[0] - d[2];
    t[1] = d[1] + d[2];
    t[2] = d[2] - d[1];
    t[3] = d[1] - d[3];
}

/* B^T d for 6 values (m = 4; the points 0, 1, -1, 2, -2 and infinity) */
static inline void winograd_bt6(const winograd_vector d[6], winograd_vector t[6]) {
    t[0] = (d[0] * 4.0f - d[2] * 5.0f) + d[4];
    t[1] = (d[3] + d[4]) - (d[1] + d[2]) * 4.0f;
    t[2] = (d[4] - d[3]) + (d[1] - d[2]) * 4.0f;
    t[3] = (d[4] - d[2]) + (d[3] - d[1]) * 2.0f;
    t[4] = (d[4] - d[2]) - (d[3] - d[1]) * 2.0f;
    t[5] = (d[1] * 4.0f - d[3] * 5.0f) + d[5];
}

/* A^T m for one column (or row) of a tile's products: 4 values to 2 (m = 2) */
static inline void winograd_at4(const winograd_vector m[4], winograd_vector y[2]) {
    y[0] = m[0] + m[1] + m[2];
    y[1] = m[1] - m[2] - m[3];
}

/* A^T m: 6 values to 4 (m = 4) */
static inline void winograd_at6(const winograd_vector m[6], winograd_vector y[4]) {
    const winograd_vector sum12 = m[1] + m[2], diff12 = m[1] - m[2];
    const winograd_vector sum34 = m[3] + m[4], diff34 = m[3] - m[4];
    y[0] = (m[0] + sum12) + sum34;
    y[1] = diff12 + diff34 * 2.0f;
    y[2] = sum12 + sum34 * 4.0f;
    y[3] = (diff12 + diff34 * 8.0f) + m[5];
}

#define WINOGRAD_MAX_POINTS 6 /* a = m + 2 for m = 4 */

/* the a x a transformed values V (position p = a r + s at V[p * T * C]) of tile t (rows
 * m ti - 1 to m ti + m, columns alike, zero outside the image) for one vector of channels
 * from c; always inlined so that m is a constant */
static inline __attribute__((always_inline)) void
winograd_input_tile(const int m, const float *image, int64_t H, int64_t W, int64_t C, int64_t ti,
                    int64_t tj, int64_t c, float *V, int64_t T, int64_t t) {
    const int a = m + 2;
    winograd_vector d[WINOGRAD_MAX_POINTS][WINOGRAD_MAX_POINTS], e[WINOGRAD_MAX_POINTS][WINOGRAD_MAX_POINTS];
    for (int r = 0; r < a; r++) {
        const int64_t i = m * ti - 1 + r;
        for (int s = 0; s < a; s++) {
            const int64_t j = m * tj - 1 + s;
            const int inside = i >= 0 && i < H && j >= 0 && j < W;
            d[r][s] = inside ? WINOGRAD_LOAD(image + (i * W + j) * C + c) : (winograd_vector){0};
        }
    }
    for (int s = 0; s < a; s++) { /* B^T d: rows */
        winograd_vector column[WINOGRAD_MAX_POINTS], out[WINOGRAD_MAX_POINTS];
        for (int r = 0; r < a; r++) column[r] = d[r][s];
        if (m == 2)
            winograd_bt4(column, out);
        else
            winograd_bt6(column, out);
        for (int r = 0; r < a; r++) e[r][s] = out[r];
    }
    for (int r = 0; r < a; r++) { /* (B^T d) B: columns */
        winograd_vector v[WINOGRAD_MAX_POINTS];
        if (m == 2)
            winograd_bt4(e[r], v);
        else
            winograd_bt6(e[r], v);
        for (int s = 0; s < a; s++) WINOGRAD_STORE(V + ((a * r + s) * T + t) * C + c, v[s]);
    }
}

/* torch.relu per lane (x < 0 ? 0 : x: -0.0 and NaN pass), as relu16_as_torch at this width */
static inline winograd_vector winograd_relu(winograd_vector v) RELU_AS_TORCH(winograd_mask)

/* the larger per lane, a NaN in v taken as PyTorch's max pool takes it */
static inline winograd_vector winograd_max(winograd_vector a, winograd_vector v) {
    winograd_mask pick = (v > a) | (v != v), kept, other;
    memcpy(&kept, &a, sizeof kept);
    memcpy(&other, &v, sizeof other);
    kept = (other & pick) | (kept & ~pick);
    memcpy(&a, &kept, sizeof a);
    return a;
}

#define WINOGRAD_NONE 0
#define WINOGRAD_RELU_MAX 1  /* ReLU, then a 2x2 max pool of stride 2 (floor) */
#define WINOGRAD_RELU_MEAN 2 /* ReLU, then the mean over the image's pixels */

/* one tile's m x m outputs Y = A^T M A for one vector of channels from o, with the bias b, by
 * `pool` (below); out is the image's output, t the tile's row of M */
static inline __attribute__((always_inline)) void
winograd_output(const int m, const float *M, int64_t T, int64_t O, int64_t t, int64_t o,
                winograd_vector b, int pool, winograd_vector *sum, float *out, int64_t H,
                int64_t W, int64_t ti, int64_t tj) {
    const int a = m + 2;
    winograd_vector e[4][WINOGRAD_MAX_POINTS], y[4][4];
    for (int s = 0; s < a; s++) { /* A^T M: columns of products to m rows */
        winograd_vector column[WINOGRAD_MAX_POINTS], rows[4];
        for (int r = 0; r < a; r++) column[r] = WINOGRAD_LOAD(M + ((a * r + s) * T + t) * O + o);
        if (m == 2)
            winograd_at4(column, rows);
        else
            winograd_at6(column, rows);
        for (int i = 0; i < m; i++) e[i][s] = rows[i];
    }
    for (int i = 0; i < m; i++) { /* (A^T M) A */
        if (m == 2)
            winograd_at4(e[i], y[i]);
        else
            winograd_at6(e[i], y[i]);
    }
    if (pool == WINOGRAD_RELU_MAX) { /* out is the image's pooled output */
        for (int pi = 0; pi < m / 2; pi++)
            for (int pj = 0; pj < m / 2; pj++) {
                const int64_t oi = m / 2 * ti + pi, oj = m / 2 * tj + pj;
                if (oi >= H / 2 || oj >= W / 2) continue;
                winograd_vector v = winograd_max(y[2 * pi][2 * pj], y[2 * pi][2 * pj + 1]);
                v = winograd_max(winograd_max(v, y[2 * pi + 1][2 * pj]), y[2 * pi + 1][2 * pj + 1]);
                WINOGRAD_STORE(out + (oi * (W / 2) + oj) * O + o, winograd_relu(v + b));
            }
        return;
    }
    for (int i = 0; i < m; i++)
        for (int j = 0; j < m; j++) {
            const int64_t oi = m * ti + i, oj = m * tj + j;
            if (oi >= H || oj >= W) continue;
            if (pool == WINOGRAD_RELU_MEAN)
                *sum += winograd_relu(y[i][j] + b);
            else
                WINOGRAD_STORE(out + (oi * W + oj) * O + o, y[i][j] + b);
        }
}

/* the products' rows a group of images fills (with 6-row blocks, a few blocks): images of few
 * tiles (4 for a 7x7 image with m = 4, 1 for a 4x4 one) are taken together, ceil(24 / tiles)
 * images a group (fewer in a batch's last group, or a batch of fewer) */
#define WINOGRAD_GROUP_ROWS 24

/* winograd_conv3x3 for images n0 to n0 + images - 1, V and M sized for their tiles */
static inline __attribute__((always_inline)) void
winograd_images(const int m, const float *x, int64_t n0, int64_t images, int64_t H, int64_t W,
                int64_t C, const float *U, const winograd_vector *biases, int64_t O, int pool,
                float *out, float *V, float *M) {
    const int a = m + 2;
    const int64_t th = (H + m - 1) / m, tw = (W + m - 1) / m, tiles = th * tw;
    const int64_t T = images * tiles, K = O / WINOGRAD_LANES;
    const int64_t out_pixels = pool == WINOGRAD_RELU_MAX ? (H / 2) * (W / 2) : H * W;
    for (int64_t n = 0; n < images; n++) {
        const float *image = x + (n0 + n) * H * W * C;
        for (int64_t ti = 0; ti < th; ti++)
            for (int64_t tj = 0; tj < tw; tj++)
                for (int64_t c = 0; c < C; c += WINOGRAD_LANES)
                    winograd_input_tile(m, image, H, W, C, ti, tj, c, V, T,
                                        n * tiles + ti * tw + tj);
    }
    for (int p = 0; p < a * a; p++)
        winograd_gemm(V + p * T * C, U + p * C * O, M + p * T * O, T, C, O);
    for (int64_t n = 0; n < images; n++) {
        winograd_vector sums[WINOGRAD_MAX_VECTORS];
        for (int64_t k = 0; k < K; k++) sums[k] = (winograd_vector){0};
        float *image_out = out + (n0 + n) * (pool == WINOGRAD_RELU_MEAN ? 1 : out_pixels) * O;
        for (int64_t ti = 0; ti < th; ti++)
            for (int64_t tj = 0; tj < tw; tj++)
                for (int64_t k = 0; k < K; k++)
                    winograd_output(m, M, T, O, n * tiles + ti * tw + tj, WINOGRAD_LANES * k,
                                    biases[k], pool, &sums[k], image_out, H, W, ti, tj);
        if (pool == WINOGRAD_RELU_MEAN)
            for (int64_t k = 0; k < K; k++)
                WINOGRAD_STORE(image_out + WINOGRAD_LANES * k, sums[k] / (float)(H * W));
    }
}

/* out = conv(x) + bias by F(m x m, 3x3), m = `tile` (2 or 4), for x (N, H, W, C)
 * channels-last and U (a^2, C, O) (the module comment); bias (O,) or NULL; then by `pool`:
 * out (N, H, W, O), or ReLU and the max pool, out (N, H / 2, W / 2, O) (the max before a
 * finite bias and the ReLU: both keep the order of values, so the same value), or ReLU and
 * the mean, out (N, O): float32 sums in the tiles' order, divided by H * W. An infinite input
 * can give a NaN where the direct sums give an infinity (the input transform subtracts
 * pixels). A NaN reaches outputs of the tiles whose input holds it, in its image only: with
 * m = 2 and the max pool the pooled outputs the direct sums' NaN reaches, with m = 4 up to the
 * rest of those tiles' (an image's logits are NaN either way, after the mean). */
int winograd_conv3x3(const float *x, int64_t N, int64_t H, int64_t W, int64_t C, const float *U,
                     const float *bias, int64_t O, int tile, int pool, float *out) {
    if (N < 1 || H < 1 || W < 1 || C < 16 || C % 16 != 0 || O < 16 || O % 16 != 0 ||
        O > WINOGRAD_MAX_OUTPUTS || (tile != 2 && tile != 4) || pool < WINOGRAD_NONE ||
        pool > WINOGRAD_RELU_MEAN)
        return REFUSED;
    const int64_t a = tile + 2, tiles = ((H + tile - 1) / tile) * ((W + tile - 1) / tile);
    int64_t group = (WINOGRAD_GROUP_ROWS + tiles - 1) / tiles;
    if (group > N) group = N;
    const size_t sizes[2] = {sizeof(float) * a * a * group * tiles * C,
                             sizeof(float) * a * a * group * tiles * O};
    float *V = aligned_alloc(64, (sizes[0] + 63) / 64 * 64);
    float *M = aligned_alloc(64, (sizes[1] + 63) / 64 * 64);
    if (V == NULL || M == NULL) {
        free(V);
        free(M);
        return NO_MEMORY;
    }
    /* no bias: -0.0, which adds nothing (+0.0 would make a -0.0 sum +0.0) */
    winograd_vector biases[WINOGRAD_MAX_VECTORS];
    for (int64_t k = 0; k < O / WINOGRAD_LANES; k++)
        biases[k] = bias ? WINOGRAD_LOAD(bias + WINOGRAD_LANES * k) : -(winograd_vector){0};
    for (int64_t n0 = 0; n0 < N; n0 += group) {
        const int64_t images = N - n0 < group ? N - n0 : group;
        if (tile == 2)
            winograd_images(2, x, n0, images, H, W, C, U, biases, O, pool, out, V, M);
        else
            winograd_images(4, x, n0, images, H, W, C, U, biases, O, pool, out, V, M);
    }
    free(V);
    free(M);
    return DONE;
}
