/* Fused CPU kernels for the DAFL generator's no-grad bf16 forward (tadfkd.models.fused).
 *
 * Each BatchNorm-LeakyReLU pair of the generator, with the nearest 2x upsampling that follows
 * it or the one-output-channel convolution that follows the last one, in one pass over memory
 * instead of three to five. Tensors are bf16 in the (n, h, w, c) index order with element
 * strides (channels-last when the channel stride is 1); affine arithmetic, the activation and
 * the last convolution in float32, rounded once to bf16 where a bf16 tensor is written.
 * Compiled on the machine that runs it (-march=native), one thread.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_CHANNELS 1024
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

static inline float leaky_relu(float v, float slope) { return v > 0.0f ? v : v * slope; }

/* Per-channel sums of x - x[0,0,0,c] and of its squares: float within a row of the image,
 * double across rows; the shift keeps E[x^2] - E[x]^2 exact enough when the mean is large
 * beside the spread. */
static inline __attribute__((always_inline)) void shifted_sums(
    const int64_t C, const int64_t sc, const uint16_t *x, int64_t N, int64_t H, int64_t W,
    int64_t sn, int64_t sh, int64_t sw, float *shift, double *sum, double *sumsq) {
    float part[MAX_CHANNELS], part2[MAX_CHANNELS];
    for (int64_t c = 0; c < C; c++) {
        shift[c] = bf16_to_float(x[c * sc]);
        sum[c] = 0.0;
        sumsq[c] = 0.0;
    }
    for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < H; h++) {
            for (int64_t c = 0; c < C; c++) part[c] = part2[c] = 0.0f;
            for (int64_t w = 0; w < W; w++) {
                const uint16_t *p = x + n * sn + h * sh + w * sw;
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
                           int64_t sn, int64_t sh, int64_t sw, int64_t sc, const float *weight,
                           const float *bias, double eps, int training, double momentum,
                           float *running_mean, float *running_var, float *scale,
                           float *shift) {
    if (C > MAX_CHANNELS || (training && N * H * W < 2)) return REFUSED;
    double mean[MAX_CHANNELS], var[MAX_CHANNELS];
    if (training) {
        float first[MAX_CHANNELS];
        double sum[MAX_CHANNELS], sumsq[MAX_CHANNELS];
        BY_CHANNELS(shifted_sums, C, sc, x, N, H, W, sn, sh, sw, first, sum, sumsq);
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

static inline __attribute__((always_inline)) void upsample_impl(
    const int64_t C, const int64_t sc, const uint16_t *x, int64_t N, int64_t H, int64_t W,
    int64_t sn, int64_t sh, int64_t sw, const float *scale, const float *shift, float slope,
    uint16_t *y) {
    uint16_t pixel[MAX_CHANNELS];
    for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < H; h++) {
            uint16_t *even = y + (n * 2 * H + 2 * h) * 2 * W * C, *odd = even + 2 * W * C;
            for (int64_t w = 0; w < W; w++) {
                const uint16_t *p = x + n * sn + h * sh + w * sw;
#pragma omp simd
                for (int64_t c = 0; c < C; c++)
                    pixel[c] = float_to_bf16(
                        leaky_relu(bf16_to_float(p[c * sc]) * scale[c] + shift[c], slope));
                memcpy(even + 2 * w * C, pixel, C * sizeof(uint16_t));
                memcpy(even + (2 * w + 1) * C, pixel, C * sizeof(uint16_t));
            }
            memcpy(odd, even, 2 * W * C * sizeof(uint16_t));
        }
}

/* y (N, 2H, 2W, C), bf16, contiguous = nearest 2x upsampling of
 * leaky_relu(scale * x + shift, slope) for x (N, H, W, C) */
int affine_leaky_relu_upsample(const uint16_t *x, int64_t N, int64_t H, int64_t W, int64_t C,
                               int64_t sn, int64_t sh, int64_t sw, int64_t sc,
                               const float *scale, const float *shift, float slope,
                               uint16_t *y) {
    if (C > MAX_CHANNELS) return REFUSED;
    BY_CHANNELS(upsample_impl, C, sc, x, N, H, W, sn, sh, sw, scale, shift, slope, y);
    return DONE;
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

/* out (N, H, W), float32 = a 3x3 convolution with one output channel, padding 1, stride 1,
 * of leaky_relu(scale * x + shift, slope) for x (N, H, W, C), channels-last (unit channel
 * stride), C = 16 * groups with groups <= 4; weight (3, 3, C), float32. Per image: the
 * activation into a float32 buffer with a zero border (the padding), then per output pixel a
 * sum over channels and taps, one accumulator per kernel row. */
int affine_leaky_relu_conv_one(const uint16_t *x, int64_t N, int64_t H, int64_t W, int64_t C,
                               int64_t sn, int64_t sh, int64_t sw, int64_t sc,
                               const float *scale, const float *shift, float slope,
                               const float *weight, float bias, float *out) {
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
        for (int64_t h = 0; h < H; h++)
            for (int64_t w = 0; w < W; w++) {
                const uint16_t *p = x + n * sn + h * sh + w * sw;
                float *a = act + (h + 1) * row + (w + 1) * C;
                for (int64_t g = 0; g < groups; g++) {
                    f32x16 v = leaky_relu16(load16_bf16(p + 16 * g) * scales[g] + shifts[g], slope);
                    memcpy(a + 16 * g, &v, sizeof v);
                }
            }
        for (int64_t i = 0; i < H; i++)
            for (int64_t j = 0; j < W; j++) {
                f32x16 top = {0}, middle = {0}, bottom = {0};
                for (int64_t g = 0; g < groups; g++) {
                    const float *a0 = act + i * row + j * C + 16 * g, *a1 = a0 + row,
                                *a2 = a1 + row;
                    top += load16(a0) * taps[0][g] + load16(a0 + C) * taps[1][g] +
                           load16(a0 + 2 * C) * taps[2][g];
                    middle += load16(a1) * taps[3][g] + load16(a1 + C) * taps[4][g] +
                              load16(a1 + 2 * C) * taps[5][g];
                    bottom += load16(a2) * taps[6][g] + load16(a2 + C) * taps[7][g] +
                              load16(a2 + 2 * C) * taps[8][g];
                }
                out[(n * H + i) * W + j] = sum16(top + middle + bottom) + bias;
            }
    }
    free(act);
    return DONE;
}
