/* Softmax cross-entropy from the logits: the loss of each row and its gradient in one pass.
 *
 * Design: a row's loss is log sum_k exp(z_k - max) - (z_y - max) and its gradient
 * softmax(z) - onehot(y); the shift by the row's maximum keeps exp from overflowing at any
 * logit, and exp, the sum and the log run in double, so the float32 result is the float64
 * one rounded. Rows are independent and split over the threads; the row losses are added
 * afterwards in row order, so the sum has the same bits for any thread count.
 */
#include <math.h>
#include <stdint.h>

#include "cnnx_kernels.h"

/* rows x classes below this many logits run on one thread: a team costs more than it saves */
#define MIN_PARALLEL_LOGITS 32768L

static double row_loss_and_gradient(int classes, const float *restrict z, int64_t label,
                                    float *restrict grad)
{
    float max = z[0];
    for (int k = 1; k < classes; ++k)
        max = z[k] > max ? z[k] : max;
    double sum = 0.0;
    for (int k = 0; k < classes; ++k)
        sum += exp((double)z[k] - max);
    double inverse = 1.0 / sum;
    for (int k = 0; k < classes; ++k)
        grad[k] = (float)(exp((double)z[k] - max) * inverse);
    grad[label] = (float)(exp((double)z[label] - max) * inverse - 1.0);
    return log(sum) - ((double)z[label] - max);
}

double cnnx_softmax_cross_entropy(int rows, int classes, const float *logits,
                                  const int64_t *labels, float *grad, double *row_losses,
                                  int n_threads)
{
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) \
        if (n_threads > 1 && (long)rows * classes >= MIN_PARALLEL_LOGITS)
    for (int r = 0; r < rows; ++r)
        row_losses[r] = row_loss_and_gradient(classes, logits + (long)r * classes, labels[r],
                                              grad + (long)r * classes);
    double total = 0.0;
    for (int r = 0; r < rows; ++r)
        total += row_losses[r];
    return total;
}
